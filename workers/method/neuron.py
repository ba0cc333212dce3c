"""One neuron end to end: explain it, simulate it, score it; rows for the `explanations` and `scores` tables.

    result = await explain_and_score(records, explainer_backend, simulator_backend, cfg)

The caller passes backends already wrapped with rate limiting, retries and the call journal. Inside, a
malformed or misaligned answer is retried with another sample; any backend error that survives the wrapper,
or answers that stay malformed, fail the neuron: `result.error` says why, `result.reason` classifies it
(schemas/failures.py) and no rows are returned (the caller records it in the ledger and moves on; a resume
tries it again). Usage counts every call, failed ones too.

The scorers are the registered classes named in `cfg.scorers` (workers/method/scorers/), run concurrently on
one shared `ScoreContext`; their rows come back in the configured order.

A neuron's negative side is explained as a unit of its own (docs/method.md §1 "Both signs"): `negative_side`
says whether the neuron has one worth explaining and returns the records the same `explain_and_score` runs on
(its bottom records, negated, as top records; its random records negated), so every scorer and the explainer
work unchanged. The caller (orchestrator/shards.py) runs both sides and tags their rows with `polarity`.
"""
from __future__ import annotations

import asyncio
import math
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone

from schemas.config import SweepConfig
from schemas.failures import FailureReason
from schemas.tables import NEGATIVE, POSITIVE, SCORES
from workers.llm.backends.base import LLMBackend, LLMError, Usage
from workers.method.explainer import ExplanationFailed, NeuronExplainer, explainer_records
from workers.method.records import ActivationRecord, NeuronRecords
from workers.method.scorers import SCORERS, check_scorer_names
from workers.method.scorers.base import Embedder, ScoreContext, Scorer
from workers.method.scoring import correlation_score, split_records
from workers.method.simulator import NeuronSimulator

__all__ = ["NEGATIVE", "POSITIVE", "ExplanationFailed", "NeuronResult", "explain_and_score", "negative_side",
           "neuron_seed"]


@dataclass
class NeuronResult:
    layer: int
    neuron: int
    explanation_rows: list[dict] = field(default_factory=list)
    score_rows: list[dict] = field(default_factory=list)
    usage: dict[str, Usage] = field(default_factory=lambda: {"explainer": Usage(), "simulator": Usage()})
    error: str | None = None
    reason: FailureReason | None = None  # set whenever `error` is
    failed_candidates: list[str] = field(default_factory=list)  # reasons of best-of-k candidates that failed

    @property
    def explanation(self) -> str | None:
        return next((r["explanation"] for r in self.explanation_rows if r["selected"]), None)


def neuron_seed(cfg: SweepConfig, layer: int, neuron: int) -> int:
    """A stable per-neuron seed (shuffles of detection/fuzzing windows) from the sweep seed."""
    return zlib.crc32(f"{cfg.seed}:{layer}:{neuron}".encode())


def negative_side(records: NeuronRecords, cfg: SweepConfig) -> NeuronRecords | None:
    """The neuron's negative side as records of its own, or None when it has none to explain: `records.negative`
    is off, the neuron has no bottom records, or its most negative activation (over its bottom records) is not
    below 0 or smaller in size than `records.negative_ratio` x its maximum (over its top records). Non-finite
    values take no part in the rule (docs/method.md §2). The returned records' top records are the bottom
    records negated (rank 0, the most negative window, first), their random records the random records negated;
    they have no quantile, bottom or classifier (stratified, non-activating) records: those are picked for the
    positive side, so the classifier scorers label this side by the `top` protocol (docs/method.md §6)."""
    if cfg.records.negative == "off" or not records.bottom or not records.top:
        return None
    low = min((x for r in records.bottom for x in r.activations if math.isfinite(x)), default=math.inf)
    high = max((x for r in records.top for x in r.activations if math.isfinite(x)), default=-math.inf)
    if not (low < 0 and -low >= cfg.records.negative_ratio * max(high, 0.0)):
        return None
    return NeuronRecords(records.layer, records.neuron, top=[_negated(r, "top") for r in records.bottom],
                         random=[_negated(r, "random") for r in records.random])


def _negated(record: ActivationRecord, kind: str) -> ActivationRecord:
    # `kind` is the role the record plays: the scorers tell a side's activating windows by kind == "top"
    return ActivationRecord(record.seq_id, record.tokens, [-x for x in record.activations], kind, record.rank)


async def explain_and_score(records: NeuronRecords, explainer: LLMBackend, simulator: LLMBackend,
                            cfg: SweepConfig, *, embedder: Embedder | None = None) -> NeuronResult:
    """Explain one neuron from its train split and score the explanation on its valid split with every
    scorer in `cfg.scorers` (the embedding scorer needs `embedder`)."""
    check_scorer_names(cfg.scorers)
    scorers = [SCORERS[name]() for name in cfg.scorers]
    result = NeuronResult(records.layer, records.neuron)
    where = f"layer {records.layer} neuron {records.neuron}"
    try:
        splits = split_records(records.top, records.random, cfg.records.n_per_split)
    except ValueError as e:
        result.error, result.reason = f"{where}: {e}", FailureReason.RECORDS
        return result
    explain, simulate = NeuronExplainer(explainer, cfg.explainer), None
    judge_spent: list[Usage] = []
    try:
        simulate = NeuronSimulator(simulator, cfg.simulator)
        await _run(records, splits, explain, simulate, scorers, cfg, embedder, result, judge_spent)
    except LLMError as e:
        result.error, result.reason = f"{where}: {type(e).__name__}: {e}", e.reason
        result.explanation_rows, result.score_rows = [], []
    finally:
        result.usage["explainer"] = explain.usage
        result.usage["simulator"] = sum(judge_spent, simulate.usage if simulate else Usage())
    return result


async def _run(records: NeuronRecords, splits: dict, explain: NeuronExplainer, simulate: NeuronSimulator,
               scorers: list[Scorer], cfg: SweepConfig, embedder: Embedder | None, result: NeuronResult,
               spent: list[Usage]) -> None:
    """Fills `result`; `spent` collects the usage of the judge calls, failed ones included."""
    now = datetime.now(timezone.utc)
    candidates = await explain.explain(explainer_records(records, splits, cfg))
    failed = [c for c in candidates if c.text is None]
    result.failed_candidates = [f"candidate {c.index}: {c.error}" for c in failed]
    good = [c for c in candidates if c.text is not None]
    texts: list[str] = [c.text for c in candidates if c.text is not None]  # good[i]'s explanation
    if not good:
        raise ExplanationFailed.from_candidates(failed)

    calibration = splits["calibration"]
    needs_simulation = any(s.needs_simulation for s in scorers)
    cal_sims = (await asyncio.gather(*(simulate.simulate(text, [r.tokens for r in calibration]) for text in texts))
                if needs_simulation or len(good) > 1 else [])
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

    ctx = ScoreContext(explanation=texts[best], records=records, splits=splits, cfg=cfg,
                       seed=neuron_seed(cfg, records.layer, records.neuron), simulator=simulate,
                       judge=simulate.backend, embedder=embedder, spent=spent,
                       candidate_scores={str(c.index): s for c, s in zip(good, cal_scores)})
    if needs_simulation:
        ctx.valid_simulation = await simulate.simulate(texts[best], [r.tokens for r in splits["valid"]])
        ctx.calibration_simulation = cal_sims[best]

    base = {"layer": records.layer, "neuron": records.neuron, "candidate": chosen.index,
            "simulator_model": simulate.backend.model}
    for scorer, rows in zip(scorers, await _score_all(scorers, ctx)):
        for row in rows:
            _check_columns(scorer.name, row)
            result.score_rows.append({**base, **row})


async def _score_all(scorers: list[Scorer], ctx: ScoreContext) -> list[list[dict]]:
    """Every scorer's rows, in order. The first failure cancels the others and waits for them to stop, so a
    failed neuron spends no more and nothing of it runs on after it returns."""
    tasks = [asyncio.ensure_future(s.score(ctx)) for s in scorers]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


_SCORE_COLUMNS = frozenset(SCORES.names)


def _check_columns(scorer: str, row: dict) -> None:
    """A column the `scores` table lacks would be dropped silently when the rows are written."""
    unknown = sorted(set(row) - _SCORE_COLUMNS)
    if unknown:
        raise ValueError(f"scorer {scorer!r} returned column(s) {', '.join(unknown)} that the scores table "
                         "(schemas/tables.py SCORES) does not have; put extra detail in `settings`")
