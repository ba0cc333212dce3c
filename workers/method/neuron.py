"""One neuron end to end: explain it, simulate it, score it; rows for the `explanations` and `scores` tables.

    result = await explain_and_score(records, explainer_backend, simulator_backend, cfg)

The caller passes backends already wrapped with rate limiting, retries and the call journal. Inside, a
malformed or misaligned answer is retried with another sample; any backend error that survives the wrapper,
or answers that stay malformed, fail the neuron: `result.error` says why and no rows are returned (the caller
records it in the ledger and moves on; a resume tries it again). Usage counts every call, failed ones too.
"""
from __future__ import annotations

import asyncio
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

from schemas.config import SweepConfig
from workers.llm.backends.base import LLMBackend, LLMError, Usage
from workers.method.explainer import NeuronExplainer
from workers.method.records import NeuronRecords
from workers.method.scorers import (Embedder, correlation_columns, detection_columns, embedding_columns,
                             fuzzing_columns, non_activating, settings_json)
from workers.method.scoring import correlation_score, split_records
from workers.method.simulator import NeuronSimulator


@dataclass
class NeuronResult:
    layer: int
    neuron: int
    explanation_rows: list[dict] = field(default_factory=list)
    score_rows: list[dict] = field(default_factory=list)
    usage: dict[str, Usage] = field(default_factory=lambda: {"explainer": Usage(), "simulator": Usage()})
    error: str | None = None
    failed_candidates: list[str] = field(default_factory=list)  # reasons of best-of-k candidates that failed

    @property
    def explanation(self) -> str | None:
        return next((r["explanation"] for r in self.explanation_rows if r["selected"]), None)


class ExplanationFailed(LLMError):
    """Every explanation candidate of a neuron failed (their reasons are in the message)."""


def neuron_seed(cfg: SweepConfig, layer: int, neuron: int) -> int:
    """A stable per-neuron seed (shuffles of detection/fuzzing windows) from the sweep seed."""
    return zlib.crc32(f"{cfg.seed}:{layer}:{neuron}".encode())


async def explain_and_score(records: NeuronRecords, explainer: LLMBackend, simulator: LLMBackend,
                            cfg: SweepConfig, *, embedder: Embedder | None = None) -> NeuronResult:
    """Explain one neuron from its train split and score the explanation on its valid split with every
    scorer in `cfg.scorers` (the embedding scorer needs `embedder`)."""
    result = NeuronResult(records.layer, records.neuron)
    where = f"layer {records.layer} neuron {records.neuron}"
    try:
        splits = split_records(records.top, records.random, cfg.records.n_per_split)
    except ValueError as e:
        result.error = f"{where}: {e}"
        return result
    explain, simulate, judge_spent = NeuronExplainer(explainer, cfg.explainer), None, []
    try:
        simulate = NeuronSimulator(simulator, cfg.simulator)
        await _run(records, splits, explain, simulate, cfg, embedder, result, judge_spent)
    except LLMError as e:
        result.error = f"{where}: {type(e).__name__}: {e}"
        result.explanation_rows, result.score_rows = [], []
    finally:
        result.usage["explainer"] = explain.usage
        result.usage["simulator"] = sum(judge_spent, simulate.usage if simulate else Usage())
    return result


async def _run(records: NeuronRecords, splits: dict, explain: NeuronExplainer, simulate: NeuronSimulator,
               cfg: SweepConfig, embedder: Embedder | None, result: NeuronResult, spent: list[Usage]) -> None:
    """Fills `result`; `spent` collects the usage of the detection/fuzzing calls, failed ones included."""
    now = datetime.now(timezone.utc)
    candidates = await explain.explain(splits["train"])
    result.failed_candidates = [f"candidate {c.index}: {c.error}" for c in candidates if c.text is None]
    good = [c for c in candidates if c.text is not None]
    if not good:
        raise ExplanationFailed("no usable explanation: " + "; ".join(result.failed_candidates))

    calibration, valid = splits["calibration"], splits["valid"]
    cal_tokens = [r.tokens for r in calibration]
    need_calibration = "correlation" in cfg.scorers or len(good) > 1
    cal_sims = (await asyncio.gather(*(simulate.simulate(c.text, cal_tokens) for c in good))
                if need_calibration else [])
    cal_scores = [correlation_score([r.activations for r in calibration], s.values) for s in cal_sims]
    best = 0
    if len(good) > 1:  # Transluce's best-of-k: highest calibration correlation, earliest candidate on ties
        best = max(range(len(good)), key=lambda i: (cal_scores[i] if cal_scores[i] is not None else -2.0, -i))
    chosen = good[best]

    for c in candidates:
        if c.text is not None:
            result.explanation_rows.append({
                "layer": records.layer, "neuron": records.neuron, "explanation": c.text, "candidate": c.index,
                "selected": c is chosen, "explainer_model": explain.backend.model,
                "prompt_tokens": c.usage.prompt_tokens, "completion_tokens": c.usage.completion_tokens,
                "created_at": now})

    base = {"layer": records.layer, "neuron": records.neuron, "candidate": chosen.index,
            "simulator_model": simulate.backend.model}
    seed = neuron_seed(cfg, records.layer, records.neuron)
    top_logprobs = cfg.simulator.top_logprobs

    if "correlation" in cfg.scorers:
        sim = await simulate.simulate(chosen.text, [r.tokens for r in valid])
        cols = correlation_columns(valid, sim.values, calibration, cal_sims[best].values)
        calibration_fit = cols.pop("_calibration")
        settings = {**simulate.settings(), "split": "valid", "calibration": calibration_fit,
                    "best_of": cfg.explainer.best_of, "candidate_calibration_scores":
                    {str(c.index): s for c, s in zip(good, cal_scores)}}
        usage = sim.usage + cal_sims[best].usage
        result.score_rows.append({**base, "scorer": "correlation", "simulator_mode": simulate.mode, **cols,
                                  "settings": settings_json(settings), "prompt_tokens": usage.prompt_tokens,
                                  "completion_tokens": usage.completion_tokens})

    quiet = non_activating(records.random)
    activating = [r for r in valid if r.kind == "top"]
    judged = []
    if "detection" in cfg.scorers:
        judged.append(("detection", detection_columns(simulate.backend, chosen.text, activating, quiet, seed=seed,
                                                      top_logprobs=top_logprobs, spent=spent)))
    if "fuzzing" in cfg.scorers:
        decoys = [r for r in calibration if r.kind == "top"]
        judged.append(("fuzzing", fuzzing_columns(simulate.backend, chosen.text, activating, decoys, seed=seed,
                                                  top_logprobs=top_logprobs, spent=spent)))
    for (name, _), (cols, usage) in zip(judged, await asyncio.gather(*(job for _, job in judged))):
        result.score_rows.append({**base, "scorer": name, "simulator_mode": "judge",
                                  "settings": settings_json(cols.pop("settings")), **cols,
                                  "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens})
    if "embedding" in cfg.scorers:
        if embedder is None:
            row = {"score": None, "null_reason": "no embedder given to the method", "settings": {}}
        else:
            row = await embedding_columns(embedder, chosen.text, activating, quiet)
        result.score_rows.append({**base, "scorer": "embedding", "simulator_model": getattr(embedder, "name", None),
                                  "simulator_mode": "embedding", "settings": settings_json(row.pop("settings")),
                                  **row})
