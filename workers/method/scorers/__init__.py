"""Scorers (docs/method.md §6), one class per file behind `Scorer` (base.py), listed in `SCORERS`:

- correlation: simulated vs true activations on the valid split, r2/absdev calibrated on the calibration split;
- detection: does the explanation tell activating windows from non-activating ones?
- fuzzing: does the explanation tell truly active tokens from randomly highlighted ones?
- embedding: cosine similarity of explanation and window embeddings, as an AUC (no LLM call).

Adding a scorer = one new file + one line in the registry below (see CONTRIBUTING.md). The names here are the
allowed values of the config's `scorers:`; `workers.method.check_config` checks them before any work.
"""
from __future__ import annotations

from schemas.config import ConfigError
from workers.method.scorers.base import Scorer
from workers.method.scorers.correlation import CorrelationScorer
from workers.method.scorers.detection import DetectionScorer
from workers.method.scorers.embedding import EmbeddingScorer
from workers.method.scorers.fuzzing import FuzzingScorer

SCORERS: dict[str, type[Scorer]] = {cls.name: cls for cls in (
    CorrelationScorer, DetectionScorer, FuzzingScorer, EmbeddingScorer)}


def check_scorer_names(names: list[str]) -> None:
    """ConfigError (one line, naming `scorers` and the allowed names) for a name nobody registered."""
    unknown = [n for n in names if n not in SCORERS]
    if unknown:
        raise ConfigError(f"scorers: {', '.join(map(repr, unknown))} "
                          f"{'is not a scorer' if len(unknown) == 1 else 'are not scorers'} "
                          f"(allowed: {', '.join(SCORERS)})")
