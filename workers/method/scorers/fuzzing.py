"""fuzzing (docs/method.md §6): does the explanation tell truly active tokens from wrongly highlighted ones?
One judging of every window, then one row per kind of decoy: `fuzzing` against standard decoys (non-activating
windows with random tokens highlighted) and `fuzzing_active` against active decoys (activating windows with
inactive tokens highlighted, harder: the window itself fits the explanation). Balanced accuracy and F1 of the
judge's 0/1 answers, and AUC when the backend gives logprobs."""
from __future__ import annotations

import math
import random
from collections.abc import Sequence

from schemas.config import Classifier
from workers.llm.backends.base import LLMBackend, Usage
from workers.method.prompts import FUZZING_SYSTEM, window_text
from workers.method.records import ActivationRecord
from workers.method.retrying import MALFORMED_ATTEMPTS
from workers.method.scorers._common import NO_NEGATIVES, judge_batched, judged_columns, non_finite_windows, spread
from workers.method.scorers.base import ScoreContext, Scorer, score_row

# a token counts as active at >= this x its window's maximum (0.4: level 4 on the 0-10 scale); one default, the config's
FUZZ_HIGHLIGHT: float = Classifier.model_fields["highlight"].default
ROW_NAMES = {"standard": "fuzzing", "active": "fuzzing_active"}  # the `scorer` column of each decoy kind's row


def active_positions(record: ActivationRecord, highlight: float = FUZZ_HIGHLIGHT) -> set[int]:
    """Tokens at or above `highlight` x the window's own maximum (none when that maximum is <= 0)."""
    top = max([0.0] + [x for x in record.activations if math.isfinite(x)])
    return {i for i, x in enumerate(record.activations) if top > 0 and x >= highlight * top}


async def fuzzing_columns(backend: LLMBackend, explanation: str, activating: list[ActivationRecord],
                          non_activating: list[ActivationRecord], *, seed: int,
                          decoys: Sequence[str] = ("standard", "active"), highlight: float = FUZZ_HIGHLIGHT,
                          top_logprobs: int = 15, batch_size: int = 5, attempts: int = MALFORMED_ATTEMPTS,
                          spent: list[Usage] | None = None, settings: dict | None = None
                          ) -> tuple[dict[str, dict], Usage]:
    """Columns per decoy kind ({kind: cols}). The correct windows are the activating ones with their active
    tokens highlighted; a standard decoy is a non-activating window with as many random tokens highlighted as a
    correct window drawn at random; an active decoy is an activating window with as many inactive tokens
    highlighted as it has active ones. Every window is judged once (shuffled with `seed`, `batch_size` per call,
    a window never twice in one call)."""
    rng = random.Random(seed)
    base = {**(settings or {}), "highlight": highlight, "prompt": "fuzzing", "batch_size": batch_size}
    items: list[tuple[int, str, ActivationRecord, set[int]]] = []  # (label, kind, window, highlighted positions)
    for rec in activating:
        if hits := active_positions(rec, highlight):
            items.append((1, "correct", rec, hits))
    counts = [len(hl) for *_, hl in items]
    if "standard" in decoys and counts:
        for rec in non_activating:
            n = min(rng.choice(counts), len(rec.tokens))
            items.append((0, "standard", rec, set(rng.sample(range(len(rec.tokens)), n))))
    if "active" in decoys:
        for _, _, rec, hits in [item for item in items if item[1] == "correct"]:
            others = [i for i in range(len(rec.tokens)) if i not in hits]
            if others:
                items.append((0, "active", rec, set(rng.sample(others, min(len(hits), len(others))))))
    rng.shuffle(items)
    batches = spread(items, batch_size, key=lambda item: item[2].seq_id)
    items = [item for batch in batches for item in batch]
    answers: list[int] = []
    probs: list[float] | None = None
    usage = Usage()
    if any(y for y, *_ in items) and not all(y for y, *_ in items):
        answers, probs, usage = await judge_batched(
            backend, FUZZING_SYSTEM, explanation,
            [[window_text(r.tokens, hl) for *_, r, hl in batch] for batch in batches],
            top_logprobs=top_logprobs, attempts=attempts, spent=spent)
    out = {}
    for kind in decoys:
        settings_k = {**base, "decoys": kind}
        sel = [i for i, (_, k, *_) in enumerate(items) if k in ("correct", kind)]
        if not any(items[i][1] == "correct" for i in sel) or not any(items[i][1] == kind for i in sel):
            reason = (NO_NEGATIVES if kind == "standard" and not non_activating
                      else "needs windows with active tokens for both kinds")
            out[kind] = {"score": None, "null_reason": reason, "settings": settings_k}
            continue
        cols = judged_columns([items[i][0] for i in sel], [answers[i] for i in sel],
                              None if probs is None else [probs[i] for i in sel], settings_k)
        cols["seq_ids"] = [items[i][2].seq_id for i in sel]
        out[kind] = cols
    return out, usage


class FuzzingScorer(Scorer):
    name = "fuzzing"
    needs_judge = True
    uses_classifier_windows = True

    async def score(self, ctx: ScoreContext) -> list[dict]:
        c = ctx.cfg.classifier
        windows = ctx.classifier_windows()
        if reason := non_finite_windows(windows.activating + windows.non_activating):  # the windows it highlights
            return [score_row(ROW_NAMES[kind], "judge", windows.settings, score=None, null_reason=reason)
                    for kind in c.decoys]
        by_kind, usage = await fuzzing_columns(
            ctx.judge, ctx.explanation, windows.activating, windows.non_activating, seed=ctx.seed, decoys=c.decoys,
            highlight=c.highlight, top_logprobs=ctx.cfg.simulator.top_logprobs, batch_size=c.batch_size,
            spent=ctx.spent, settings=windows.settings)
        # one judging serves every row: its tokens are counted on the first row only
        return [score_row(ROW_NAMES[kind], "judge", cols.pop("settings"), usage if i == 0 else None, **cols)
                for i, (kind, cols) in enumerate(by_kind.items())]
