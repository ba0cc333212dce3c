"""Stage 2, the method: records -> splits -> explainer -> simulator -> scorers -> score rows for one neuron
(neuron.py ties them together). The scoring math in scoring.py is pure; LLM calls go through workers/llm/.

`check_config(cfg)` checks the config's names that the method's registries define (`scorers`,
`simulator.mode`); the planner and the CLI call it before any work starts.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from schemas.config import SweepConfig


def check_config(cfg: SweepConfig) -> None:
    """ConfigError (one line naming the field and the allowed values) for a scorer or simulator mode that is
    not registered (workers.method.scorers.SCORERS, workers.method.simulator.SIMULATOR_MODES)."""
    # imported here so that importing any one module of the method does not load every registry
    from workers.method.scorers import check_scorer_names
    from workers.method.simulator import check_mode_name

    check_scorer_names(cfg.scorers)
    check_mode_name(cfg.simulator.mode)
