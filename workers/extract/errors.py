"""The one error type of extraction, shared by the worker side (workers/extract/) and its driver
(orchestrator/extraction/), and caught by the CLI to print it as one line."""
from __future__ import annotations


class ExtractError(ValueError):
    """A problem with the extraction inputs, reported as one line."""
