"""embedding (docs/method.md §6): cosine similarity of the explanation's and the windows' sentence embeddings,
as an AUC separating activating from non-activating windows. No LLM call."""
from __future__ import annotations

import asyncio
from typing import Any

from workers.method.records import ActivationRecord
from workers.method.scorers._common import NO_NEGATIVES, non_finite_windows
from workers.method.scorers.base import Embedder, ScoreContext, Scorer, score_row
from workers.method.scoring import roc_auc


async def embedding_columns(embedder: Embedder, explanation: str, activating: list[ActivationRecord],
                            quiet: list[ActivationRecord]) -> dict:
    """AUC of cosine(explanation, window) separating activating from non-activating windows."""
    settings = {"embedder": embedder.name, "windows": "valid top records vs random records with max <= 0"}
    if not quiet:
        return {"score": None, "null_reason": NO_NEGATIVES, "settings": settings}
    windows = activating + quiet
    vectors = await asyncio.to_thread(embedder.embed, [explanation] + ["".join(r.tokens) for r in windows])
    sims = [float(x) for x in vectors[1:] @ vectors[0]]
    labels = [1] * len(activating) + [0] * len(quiet)
    score = roc_auc(labels, sims)
    return {"score": score, "null_reason": None if score is not None else "needs both kinds of windows",
            "settings": settings, "seq_ids": [r.seq_id for r in windows]}


class EmbeddingScorer(Scorer):
    name = "embedding"
    needs_embedder = True

    async def score(self, ctx: ScoreContext) -> list[dict]:
        cols: dict[str, Any]
        if ctx.embedder is None:
            cols = {"score": None, "null_reason": "no embedder given to the method", "settings": {}}
        elif reason := non_finite_windows(ctx.activating + ctx.records.random):  # the windows it labels
            cols = {"score": None, "null_reason": reason, "settings": {}}
        else:
            cols = await embedding_columns(ctx.embedder, ctx.explanation, ctx.activating, ctx.quiet)
        return [score_row(self.name, "embedding", cols.pop("settings"),
                          simulator_model=getattr(ctx.embedder, "name", None), **cols)]
