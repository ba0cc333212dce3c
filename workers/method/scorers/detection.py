"""detection (docs/method.md §6): does the explanation tell activating windows from non-activating ones?
Balanced accuracy and F1 of the judge's 0/1 answers, and AUC when the backend gives logprobs."""
from __future__ import annotations

import random

from workers.llm.backends.base import LLMBackend, Usage
from workers.method.prompts import DETECTION_SYSTEM, window_text
from workers.method.records import ActivationRecord
from workers.method.retrying import MALFORMED_ATTEMPTS
from workers.method.scorers._common import (
    NO_NEGATIVES,
    batched,
    judge_batched,
    judged_columns,
    non_finite_windows,
)
from workers.method.scorers.base import ScoreContext, Scorer, score_row


async def detection_columns(backend: LLMBackend, explanation: str, activating: list[ActivationRecord],
                            non_activating: list[ActivationRecord], *, seed: int, top_logprobs: int = 15,
                            batch_size: int = 5, attempts: int = MALFORMED_ATTEMPTS,
                            spent: list[Usage] | None = None, settings: dict | None = None) -> tuple[dict, Usage]:
    """The judge's answers on every window (shuffled with `seed`, `batch_size` per call): 1 for the activating
    windows, 0 for the non-activating ones. `settings`: how the windows were chosen, stored with the score."""
    settings = {**(settings or {}), "prompt": "detection", "batch_size": batch_size}
    if not non_activating:
        return {"score": None, "null_reason": NO_NEGATIVES, "settings": settings}, Usage()
    items = [(1, r) for r in activating] + [(0, r) for r in non_activating]
    random.Random(seed).shuffle(items)
    answers, probs, usage = await judge_batched(backend, DETECTION_SYSTEM, explanation,
                                                batched([window_text(r.tokens) for _, r in items], batch_size),
                                                top_logprobs=top_logprobs, attempts=attempts, spent=spent)
    cols = judged_columns([y for y, _ in items], answers, probs, settings)
    cols["seq_ids"] = [r.seq_id for _, r in items]
    return cols, usage


class DetectionScorer(Scorer):
    name = "detection"
    needs_judge = True
    uses_classifier_windows = True

    async def score(self, ctx: ScoreContext) -> list[dict]:
        windows = ctx.classifier_windows()
        if reason := non_finite_windows(windows.activating + windows.non_activating):  # the windows it labels
            return [score_row(self.name, "judge", windows.settings, score=None, null_reason=reason)]
        cols, usage = await detection_columns(ctx.judge, ctx.explanation, windows.activating, windows.non_activating,
                                              seed=ctx.seed, top_logprobs=ctx.cfg.simulator.top_logprobs,
                                              batch_size=ctx.cfg.classifier.batch_size, spent=ctx.spent,
                                              settings=windows.settings)
        return [score_row(self.name, "judge", cols.pop("settings"), usage, **cols)]
