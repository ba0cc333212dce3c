"""The explainer (docs/method.md §4): one sentence about what a neuron responds to, from its train records
(or, with `explainer.examples: stratified`, from one classifier window per activating bin: `explainer_records`).

Defaults: one explanation at the configured temperature (0). With `explainer.best_of = k`, k candidates are
sampled at temperature 1; the caller scores each on the calibration split and keeps the best, and every
candidate is recorded. An empty or unusable answer is retried with another sample and then recorded as a
failed candidate with its reason: it never becomes a placeholder explanation that gets scored.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from schemas.config import Explainer as ExplainerConfig
from schemas.config import SweepConfig
from schemas.failures import FailureReason
from workers.llm.backends.base import LLMBackend, LLMError, Usage
from workers.llm.verdict import judged
from workers.method.prompts import (
    EXPLAINER_EXAMPLES,
    EchoedExampleError,
    MalformedAnswerError,
    clean_explanation,
    explainer_messages,
)
from workers.method.records import ActivationRecord, NeuronRecords
from workers.method.retrying import MALFORMED_ATTEMPTS, malformed_retrying, sample_settings
from workers.method.scoring import normalize_activations

BEST_OF_TEMPERATURE = 1.0


@dataclass
class Candidate:
    index: int
    text: str | None  # None when the candidate failed
    error: str | None = None
    reason: FailureReason | None = None  # set with `error`
    usage: Usage = field(default_factory=Usage)
    attempts: int = 0


class ExplanationFailed(LLMError):
    """Every explanation candidate of a neuron failed (their errors are in the message)."""
    reason = FailureReason.MALFORMED

    @classmethod
    def from_candidates(cls, failed: list[Candidate]) -> ExplanationFailed:
        """Carries the first failed candidate's reason (MALFORMED when none has one)."""
        reason = next((c.reason for c in failed if c.reason is not None), None)
        return cls("no usable explanation: " + "; ".join(f"candidate {c.index}: {c.error}" for c in failed),
                   reason=reason)


def explainer_records(records: NeuronRecords, splits: dict[str, list[ActivationRecord]],
                      cfg: SweepConfig) -> list[ActivationRecord]:
    """The windows the explainer is shown: the train split (`explainer.examples: top`), or with `stratified` the
    first classifier window of each activating bin (extraction then picks classifier.per_bin + 1 per bin, and
    the scorers leave these out), highest bin first. Records without classifier windows (a run extracted
    without them, a negative side) fall back to the train split."""
    if cfg.explainer.examples == "stratified" and records.stratified:
        per = cfg.classifier.per_bin + 1
        return sorted((r for r in records.stratified if r.rank % per == 0), key=lambda r: -r.rank)
    return splits["train"]


def explainer_prompt(records: list[ActivationRecord], *, worked_examples: bool = True) -> list[dict]:
    """The chat messages for these records, normalized together (max over all of them, docs/method.md §3);
    without `worked_examples`, the instructions and the records alone."""
    values = normalize_activations([r.activations for r in records])
    return explainer_messages([(r.tokens, v) for r, v in zip(records, values, strict=True)],
                              EXPLAINER_EXAMPLES if worked_examples else ())


class NeuronExplainer:
    def __init__(self, backend: LLMBackend, cfg: ExplainerConfig | None = None, *,
                 attempts: int = MALFORMED_ATTEMPTS):
        self.backend = backend
        self.cfg = cfg or ExplainerConfig()
        self.attempts = attempts
        self.usage = Usage()  # everything this explainer spent, failed attempts included

    @property
    def temperature(self) -> float:
        return self.cfg.temperature if self.cfg.best_of == 1 else BEST_OF_TEMPERATURE

    async def explain(self, records: list[ActivationRecord]) -> list[Candidate]:
        """`best_of` candidates (failed ones included, with their reason). Backend errors propagate."""
        without = explainer_prompt(records, worked_examples=False)
        prompts = {True: explainer_prompt(records) if self.cfg.worked_examples else without, False: without}
        return list(await asyncio.gather(*(self._candidate(i, prompts) for i in range(self.cfg.best_of))))

    async def _candidate(self, index: int, prompts: dict[bool, list[dict]]) -> Candidate:
        cand = Candidate(index, None)
        echoed = False  # a small model that copied a worked example is asked again without them
        try:
            async for attempt in malformed_retrying(self.attempts):
                with attempt:
                    messages = prompts[not echoed]
                    cand.attempts = attempt.retry_state.attempt_number
                    temperature, seed = sample_settings(self.temperature, cand.attempts)
                    if self.cfg.best_of > 1:  # distinct requests, so candidates differ (and miss the journal)
                        seed = index * self.attempts + cand.attempts
                    resp = await self.backend.chat(messages, max_tokens=self.cfg.max_tokens,
                                                   temperature=temperature, seed=seed)
                    cand.usage += resp.usage
                    self.usage += resp.usage
                    async with judged(resp):  # the journal keeps an answer only if it parses
                        try:
                            cand.text = clean_explanation(resp.text)
                        except EchoedExampleError:
                            echoed = True
                            raise
        except MalformedAnswerError as e:
            cand.error = f"{e} (after {cand.attempts} attempts)"
            cand.reason = e.reason
        return cand
