"""The simulator (SPEC.md §5): given an explanation, predict a neuron's activation on every token.

Three modes, picked from the backend's capabilities unless `simulator.mode` forces one:
- prompt_logprob: one placeholder per token in a completion prompt; the backend returns the next-token
  distribution at each placeholder (local forward pass, or echo + logprobs); prediction = expected value.
- generated_logprob: a chat model echoes `token<TAB>value` lines with top_logprobs; prediction = expected
  value over the numeric alternatives at each value token.
- logprob_free: the same chat format, integers parsed directly.
An answer that cannot be aligned with the record's tokens is retried with another sample (tenacity) and
then fails; it is never scored as zeros.
"""
from __future__ import annotations

import asyncio
import bisect
from dataclasses import dataclass, field

from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt

from schemas.config import Simulator as SimulatorConfig
from workers.llm.backends.base import LLMBackend, TokenAlternatives, UnsupportedError, Usage
from workers.method.prompts import (PROMPT_VERSION, MalformedAnswerError, parse_simulator_answer,
                             simulator_chat_messages, simulator_completion_prompt, simulator_max_tokens)
from workers.method.scoring import expected_value

MODES = ("prompt_logprob", "generated_logprob", "logprob_free")
MALFORMED_ATTEMPTS = 3  # tries per call when the model's answer is malformed or misaligned
RETRY_TEMPERATURE = 0.7  # a retry must be able to give a different answer (and miss the call journal)


def choose_mode(backend: LLMBackend, requested: str = "auto") -> str:
    """The requested mode, or the best one the backend supports; UnsupportedError if it cannot do it."""
    caps = backend.capabilities
    supported = {"prompt_logprob": caps.prompt_logprobs, "generated_logprob": caps.chat and caps.chat_logprobs,
                 "logprob_free": caps.chat}
    if requested == "auto":
        for mode in MODES:
            if supported[mode]:
                return mode
        raise UnsupportedError(f"backend {backend.provider}/{backend.model} can neither chat nor give logprobs")
    if requested not in supported:
        raise ValueError(f"unknown simulator mode {requested!r} (allowed: auto, {', '.join(MODES)})")
    if not supported[requested]:
        raise UnsupportedError(f"simulator.mode={requested} needs a capability that backend "
                               f"{backend.provider}/{backend.model} lacks ({caps})")
    return requested


def malformed_retrying(attempts: int = MALFORMED_ATTEMPTS) -> AsyncRetrying:
    return AsyncRetrying(stop=stop_after_attempt(attempts), retry=retry_if_exception_type(MalformedAnswerError),
                         reraise=True)


def sample_settings(base_temperature: float, attempt: int) -> tuple[float, int | None]:
    """(temperature, seed) for a numbered attempt: the first as configured, later ones sampled with a new seed."""
    if attempt <= 1:
        return base_temperature, None
    return max(base_temperature, RETRY_TEMPERATURE), attempt


def values_from_logprobs(text_tokens: list[TokenAlternatives], offsets: list[int]) -> list[float]:
    """Expected value at each character offset of the answer, from the generated token that covers it."""
    starts, pos = [], 0
    for tok in text_tokens:
        starts.append(pos)
        pos += len(tok.token)
    out = []
    for offset in offsets:
        i = bisect.bisect_right(starts, offset) - 1
        if i < 0 or offset >= pos:
            raise MalformedAnswerError(f"no generated token covers answer offset {offset}")
        tok = text_tokens[i]
        out.append(expected_value(tok.top or {tok.token: tok.logprob}))
    return out


@dataclass
class Simulation:
    values: list[list[float]]  # one prediction per token, per record, in the given order
    usage: Usage = field(default_factory=Usage)
    calls: int = 0


class NeuronSimulator:
    """Predicts activations for records given an explanation, in one of the three modes."""

    def __init__(self, backend: LLMBackend, cfg: SimulatorConfig | None = None, *,
                 attempts: int = MALFORMED_ATTEMPTS):
        self.backend = backend
        self.cfg = cfg or SimulatorConfig()
        self.mode = choose_mode(backend, self.cfg.mode)
        self.attempts = attempts
        self.usage = Usage()  # everything this simulator spent, failed attempts included

    def settings(self) -> dict:
        """What produced a score: stored with it (scores.settings, scores.simulator_mode)."""
        return {"mode": self.mode, "top_logprobs": self.cfg.top_logprobs if self.mode != "logprob_free" else None,
                "records_per_call": self.cfg.records_per_call, "prompt_version": PROMPT_VERSION}

    async def simulate(self, explanation: str, token_lists: list[list[str]]) -> Simulation:
        """Predictions for every token of every record; several records per call if configured."""
        size = self.cfg.records_per_call
        chunks = [token_lists[i:i + size] for i in range(0, len(token_lists), size)]
        results = await asyncio.gather(*(self._simulate_chunk(explanation, chunk) for chunk in chunks))
        sim = Simulation(values=[])
        for values, usage, calls in results:
            sim.values += values
            sim.usage += usage
            sim.calls += calls
        return sim

    async def _simulate_chunk(self, explanation: str, token_lists: list[list[str]]):
        usage, calls = Usage(), 0
        async for attempt in malformed_retrying(self.attempts):
            with attempt:
                calls += 1
                spent: list[Usage] = []  # filled by the call even when its answer turns out malformed
                try:
                    if self.mode == "prompt_logprob":
                        values = await self._prompt_logprob(explanation, token_lists, spent)
                    else:
                        values = await self._chat(explanation, token_lists, attempt.retry_state.attempt_number,
                                                  spent)
                finally:
                    for u in spent:
                        usage += u
                        self.usage += u
        return values, usage, calls

    async def _prompt_logprob(self, explanation: str, token_lists: list[list[str]], spent: list[Usage]):
        prompt, offsets = simulator_completion_prompt(explanation, token_lists)
        resp = await self.backend.prompt_logprobs(prompt, offsets, top_k=self.cfg.top_logprobs)
        spent.append(resp.usage)
        if len(resp.positions) != len(offsets):
            raise MalformedAnswerError(f"backend returned {len(resp.positions)} positions for {len(offsets)} "
                                       "placeholders")
        flat = iter([expected_value(top) for top in resp.positions])
        return [[next(flat) for _ in tokens] for tokens in token_lists]

    async def _chat(self, explanation: str, token_lists: list[list[str]], attempt: int, spent: list[Usage]):
        temperature, seed = sample_settings(0.0, attempt)
        with_logprobs = self.mode == "generated_logprob"
        resp = await self.backend.chat(simulator_chat_messages(explanation, token_lists),
                                       max_tokens=simulator_max_tokens(token_lists), temperature=temperature,
                                       top_logprobs=self.cfg.top_logprobs if with_logprobs else None, seed=seed)
        spent.append(resp.usage)
        if not with_logprobs:
            parsed = parse_simulator_answer(resp.text, token_lists)
            return [[float(p.value) for p in rec] for rec in parsed]
        if not resp.logprobs:
            raise MalformedAnswerError("the backend returned no logprobs in generated_logprob mode")
        text = "".join(t.token for t in resp.logprobs)  # offsets must index the tokens' own text
        parsed = parse_simulator_answer(text, token_lists)
        flat = iter(values_from_logprobs(resp.logprobs, [p.offset for rec in parsed for p in rec]))
        return [[next(flat) for _ in rec] for rec in parsed]
