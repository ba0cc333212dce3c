"""The explainer (SPEC.md §4): one sentence about what a neuron responds to, from its train records.

Defaults: one explanation at the configured temperature (0). With `explainer.best_of = k`, k candidates are
sampled at temperature 1; the caller scores each on the calibration split and keeps the best, and every
candidate is recorded. An empty or unusable answer is retried with another sample and then recorded as a
failed candidate with its reason: it never becomes a placeholder explanation that gets scored.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from schemas.config import Explainer as ExplainerConfig
from workers.llm.backends.base import LLMBackend, Usage
from workers.method.prompts import MalformedAnswerError, clean_explanation, explainer_messages
from workers.method.records import ActivationRecord
from workers.method.scoring import normalize_activations
from workers.method.simulator import MALFORMED_ATTEMPTS, malformed_retrying, sample_settings

BEST_OF_TEMPERATURE = 1.0


@dataclass
class Candidate:
    index: int
    text: str | None  # None when the candidate failed
    error: str | None = None
    usage: Usage = field(default_factory=Usage)
    attempts: int = 0


def explainer_prompt(records: list[ActivationRecord]) -> list[dict]:
    """The chat messages for these records, normalized together (max over all of them, SPEC §3)."""
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
                    cand.text = clean_explanation(resp.text)
        except MalformedAnswerError as e:
            cand.error = f"{e} (after {cand.attempts} attempts)"
        return cand
