"""The local web viewer of a run (`neuronsweep view RUN`); see `app.py`."""
from orchestrator.results.viewer.app import create_app, serve

__all__ = ["create_app", "serve"]
