"""detection (docs/method.md §6): does the explanation tell activating windows from non-activating ones?
Balanced accuracy of the judge's 0/1 answers, and AUC when the backend gives logprobs."""
from __future__ import annotations

import random

from workers.llm.backends.base import LLMBackend, Usage
from workers.method.prompts import DETECTION_SYSTEM, window_text
from workers.method.records import ActivationRecord
from workers.method.retrying import MALFORMED_ATTEMPTS
from workers.method.scorers._common import NO_NEGATIVES, judge, judged_columns, non_finite_windows
from workers.method.scorers.base import ScoreContext, Scorer, score_row


async def detection_columns(backend: LLMBackend, explanation: str, activating: list[ActivationRecord],
                            quiet: list[ActivationRecord], *, seed: int, top_logprobs: int = 15,
                            attempts: int = MALFORMED_ATTEMPTS, spent: list[Usage] | None = None
                            ) -> tuple[dict, Usage]:
    """Balanced accuracy of the model telling activating windows from non-activating ones (shuffled)."""
    settings = {"windows": "valid top records vs random records with max <= 0", "prompt": "detection"}
    if not quiet:
        return {"score": None, "null_reason": NO_NEGATIVES, "settings": settings}, Usage()
    quiet = quiet[:len(activating)]
    items = [(1, r) for r in activating] + [(0, r) for r in quiet]
    random.Random(seed).shuffle(items)
    answers, probs, usage = await judge(backend, DETECTION_SYSTEM, explanation,
                                        [window_text(r.tokens) for _, r in items],
                                        top_logprobs=top_logprobs, attempts=attempts, spent=spent)
    cols = judged_columns([y for y, _ in items], answers, probs, settings)
    cols["seq_ids"] = [r.seq_id for _, r in items]
    return cols, usage


class DetectionScorer(Scorer):
    name = "detection"
    needs_judge = True

    async def score(self, ctx: ScoreContext) -> list[dict]:
        if reason := non_finite_windows(ctx.activating + ctx.records.random):  # the windows it labels
            return [score_row(self.name, "judge", {}, score=None, null_reason=reason)]
        cols, usage = await detection_columns(ctx.judge, ctx.explanation, ctx.activating, ctx.quiet, seed=ctx.seed,
                                              top_logprobs=ctx.cfg.simulator.top_logprobs, spent=ctx.spent)
        return [score_row(self.name, "judge", cols.pop("settings"), usage, **cols)]
