"""The explainer (docs/method.md §4): one sentence about what a neuron responds to, from its train records.

Defaults: one explanation at the configured temperature (0). With `explainer.best_of = k`, k candidates are
sampled at temperature 1; the caller scores each on the calibration split and keeps the best, and every
candidate is recorded. An empty or unusable answer is retried with another sample and then recorded as a
failed candidate with its reason: it never becomes a placeholder explanation that gets scored.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from schemas.config import Explainer as ExplainerConfig
from schemas.failures import FailureReason
from workers.llm.backends.base import LLMBackend, LLMError, Usage
from workers.llm.verdict import judged
from workers.method.prompts import MalformedAnswerError, clean_explanation, explainer_messages
from workers.method.records import ActivationRecord
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


def explainer_prompt(records: list[ActivationRecord]) -> list[dict]:
    """The chat messages for these records, normalized together (max over all of them, docs/method.md §3)."""
    values = normalize_activations([r.activations for r in records])
    return explainer_messages([(r.tokens, v) for r, v in zip(records, values, strict=True)])


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
        messages = explainer_prompt(records)
        return list(await asyncio.gather(*(self._candidate(i, messages) for i in range(self.cfg.best_of))))

    async def _candidate(self, index: int, messages: list[dict]) -> Candidate:
        cand = Candidate(index, None)
        try:
            async for attempt in malformed_retrying(self.attempts):
                with attempt:
                    cand.attempts = attempt.retry_state.attempt_number
                    temperature, seed = sample_settings(self.temperature, cand.attempts)
                    if self.cfg.best_of > 1:  # distinct requests, so candidates differ (and miss the journal)
                        seed = index * self.attempts + cand.attempts
                    resp = await self.backend.chat(messages, max_tokens=self.cfg.max_tokens,
                                                   temperature=temperature, seed=seed)
                    cand.usage += resp.usage
                    self.usage += resp.usage
                    async with judged(resp):  # the journal keeps an answer only if it parses
                        cand.text = clean_explanation(resp.text)
        except MalformedAnswerError as e:
            cand.error = f"{e} (after {cand.attempts} attempts)"
            cand.reason = e.reason
        return cand
