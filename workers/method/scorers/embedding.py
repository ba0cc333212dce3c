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
                            non_activating: list[ActivationRecord], settings: dict | None = None) -> dict:
    """AUC of cosine(explanation, window) separating activating from non-activating windows. `settings`: how
    the windows were chosen, stored with the score."""
    settings = {**(settings or {}), "embedder": embedder.name}
    if not non_activating:
        return {"score": None, "null_reason": NO_NEGATIVES, "settings": settings}
    windows = activating + non_activating
    vectors = await asyncio.to_thread(embedder.embed, [explanation] + ["".join(r.tokens) for r in windows])
    sims = [float(x) for x in vectors[1:] @ vectors[0]]
    labels = [1] * len(activating) + [0] * len(non_activating)
    score = roc_auc(labels, sims)
    settings.update(n_positive=len(activating), n_negative=len(non_activating))
    return {"score": score, "null_reason": None if score is not None else "needs both kinds of windows",
            "settings": settings, "seq_ids": [r.seq_id for r in windows]}


class EmbeddingScorer(Scorer):
    name = "embedding"
    needs_embedder = True
    uses_classifier_windows = True

    async def score(self, ctx: ScoreContext) -> list[dict]:
        cols: dict[str, Any]
        windows = ctx.classifier_windows()
        if ctx.embedder is None:
            cols = {"score": None, "null_reason": "no embedder given to the method", "settings": windows.settings}
        elif reason := non_finite_windows(windows.activating + windows.non_activating):  # the windows it labels
            cols = {"score": None, "null_reason": reason, "settings": windows.settings}
        else:
            cols = await embedding_columns(ctx.embedder, ctx.explanation, windows.activating,
                                           windows.non_activating, windows.settings)
        return [score_row(self.name, "embedding", cols.pop("settings"),
                          simulator_model=getattr(ctx.embedder, "name", None), **cols)]
