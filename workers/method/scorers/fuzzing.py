"""fuzzing (docs/method.md §6): does the explanation tell truly active tokens from randomly highlighted ones?
Balanced accuracy of the judge's 0/1 answers, and AUC when the backend gives logprobs."""
from __future__ import annotations

import random

from workers.llm.backends.base import LLMBackend, Usage
from workers.method.prompts import FUZZING_SYSTEM, window_text
from workers.method.records import ActivationRecord
from workers.method.retrying import MALFORMED_ATTEMPTS
from workers.method.scorers._common import judge, judged_columns, non_finite_windows
from workers.method.scorers.base import ScoreContext, Scorer, score_row
from workers.method.scoring import normalize_activations

FUZZ_ACTIVE_LEVEL = 4  # a token counts as active for fuzzing at >= 4 on its window's 0-10 scale


def active_positions(record: ActivationRecord, level: int = FUZZ_ACTIVE_LEVEL) -> set[int]:
    """Tokens at or above `level` on the window's own 0-10 scale (docs/method.md §3)."""
    return {i for i, v in enumerate(normalize_activations([record.activations])[0]) if v >= level}


async def fuzzing_columns(backend: LLMBackend, explanation: str, correct: list[ActivationRecord],
                          decoys: list[ActivationRecord], *, seed: int, top_logprobs: int = 15,
                          attempts: int = MALFORMED_ATTEMPTS, spent: list[Usage] | None = None
                          ) -> tuple[dict, Usage]:
    """Balanced accuracy of the model telling truly active tokens (highlighted in `correct` windows) from the
    same number of random tokens highlighted in `decoys` windows (activating windows of another split)."""
    rng = random.Random(seed)
    settings = {"active_level": FUZZ_ACTIVE_LEVEL, "windows": "valid top (true highlights) vs calibration top "
                "(random highlights)", "prompt": "fuzzing"}
    items: list[tuple[int, ActivationRecord, set[int]]] = []
    for rec in correct:
        if hits := active_positions(rec):
            items.append((1, rec, hits))
    for rec in decoys:
        hits = active_positions(rec)
        others = [i for i in range(len(rec.tokens)) if i not in hits]
        if hits and others:
            items.append((0, rec, set(rng.sample(others, min(len(hits), len(others))))))
    if not any(y for y, *_ in items) or all(y for y, *_ in items):
        return {"score": None, "null_reason": "needs windows with active tokens for both kinds",
                "settings": settings}, Usage()
    rng.shuffle(items)
    answers, probs, usage = await judge(backend, FUZZING_SYSTEM, explanation,
                                        [window_text(r.tokens, hl) for _, r, hl in items],
                                        top_logprobs=top_logprobs, attempts=attempts, spent=spent)
    cols = judged_columns([y for y, *_ in items], answers, probs, settings)
    cols["seq_ids"] = [r.seq_id for _, r, _ in items]
    return cols, usage


class FuzzingScorer(Scorer):
    name = "fuzzing"
    needs_judge = True

    async def score(self, ctx: ScoreContext) -> list[dict]:
        decoys = [r for r in ctx.splits["calibration"] if r.kind == "top"]
        if reason := non_finite_windows(ctx.activating + decoys):  # the windows whose tokens it highlights
            return [score_row(self.name, "judge", {}, score=None, null_reason=reason)]
        cols, usage = await fuzzing_columns(ctx.judge, ctx.explanation, ctx.activating, decoys, seed=ctx.seed,
                                            top_logprobs=ctx.cfg.simulator.top_logprobs, spent=ctx.spent)
        return [score_row(self.name, "judge", cols.pop("settings"), usage, **cols)]
