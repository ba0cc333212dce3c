"""The simulator (docs/method.md §5): given an explanation, predict a neuron's activation on every token.

Each mode is one class behind `SimulatorMode` (base.py), listed in `SIMULATOR_MODES` in order of preference:
`simulator.mode: auto` takes the first one the backend's capabilities support, any other value forces that
mode. Adding a mode = one new file + one line in the registry below.

Before its first call a simulator asks how the backend's tokenizer writes "10" (simulator/values.py) and
settles how its mode reads values; a mode that cannot read them right (prompt_logprob on a tokenizer that
writes "1" + "0", without branches) is refused: `auto` takes the next mode, a forced mode fails.

An answer that cannot be aligned with the record's tokens is retried with another sample (tenacity) and
then fails; it is never scored as zeros.
"""
from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from schemas.config import ConfigError
from schemas.config import Simulator as SimulatorConfig
from workers.llm.backends.base import LLMBackend, UnsupportedError, Usage
from workers.method.prompts import PROMPT_VERSION
from workers.method.retrying import MALFORMED_ATTEMPTS, malformed_retrying
from workers.method.simulator.base import SimulatorMode
from workers.method.simulator.generated_logprob import GeneratedLogprob
from workers.method.simulator.logprob_free import LogprobFree
from workers.method.simulator.prompt_logprob import PromptLogprob
from workers.method.simulator.values import ValueReading, detect_digits_split

AUTO = "auto"
SIMULATOR_MODES: dict[str, type[SimulatorMode]] = {
    cls.name: cls for cls in (PromptLogprob, GeneratedLogprob, LogprobFree)}  # best first


def check_mode_name(requested: str) -> None:
    """ConfigError (one line, naming `simulator.mode` and the allowed values) for a mode nobody registered."""
    if requested != AUTO and requested not in SIMULATOR_MODES:
        raise ConfigError(f"simulator.mode: {requested!r} is not a simulator mode "
                          f"(allowed: {AUTO}, {', '.join(SIMULATOR_MODES)})")


def choose_mode(backend: LLMBackend, requested: str = AUTO) -> str:
    """The requested mode, or the best one the backend supports; UnsupportedError if it cannot do it."""
    check_mode_name(requested)
    caps = backend.capabilities
    if requested == AUTO:
        for name, mode in SIMULATOR_MODES.items():
            if mode.supported(caps):
                return name
        raise UnsupportedError(f"backend {backend.provider}/{backend.model} can neither chat nor give logprobs")
    if not SIMULATOR_MODES[requested].supported(caps):
        raise UnsupportedError(f"simulator.mode={requested} needs a capability that backend "
                               f"{backend.provider}/{backend.model} lacks ({caps})")
    return requested


@dataclass
class Simulation:
    values: list[list[float]]  # one prediction per token, per record, in the given order
    usage: Usage = field(default_factory=Usage)
    calls: int = 0


class NeuronSimulator:
    """Predicts activations for records given an explanation, in the mode chosen for its backend."""

    def __init__(self, backend: LLMBackend, cfg: SimulatorConfig | None = None, *,
                 attempts: int = MALFORMED_ATTEMPTS):
        self.backend = backend
        self.cfg = cfg or SimulatorConfig()
        self.mode = choose_mode(backend, self.cfg.mode)
        self._mode = SIMULATOR_MODES[self.mode]()
        self.reading: ValueReading | None = None  # set by `prepare`
        self.refused: dict[str, str] = {}  # modes `auto` passed over in `prepare`, and why
        self.attempts = attempts
        self.usage = Usage()  # everything this simulator spent, failed attempts included

    def settings(self) -> dict:
        """What produced a score: stored with it (scores.settings, scores.simulator_mode). Once prepared it
        also says how values were read (`ten_from`, `digits_split`, `spaced_digits`; simulator/values.py)."""
        top_logprobs = self.cfg.top_logprobs if self._mode.uses_logprobs else None
        out: dict[str, Any] = {"mode": self.mode, "top_logprobs": top_logprobs,
                               "records_per_call": self.cfg.records_per_call, "prompt_version": PROMPT_VERSION}
        if self.refused:
            out["refused_modes"] = dict(self.refused)
        return {**out, **self.reading.settings()} if self.reading else out

    async def prepare(self) -> ValueReading:
        """Learn how the backend's tokenizer writes "10" (once per backend) and settle how values are read. In
        `auto` mode, a mode that refuses this tokenizer gives way to the next supported one."""
        if self.reading is None:
            # only prompt_logprob reads values by the answer; the chat modes just record it
            split = await detect_digits_split(self.backend, required=self.mode == PromptLogprob.name)
            caps = self.backend.capabilities
            names = list(SIMULATOR_MODES)
            candidates = [self.mode] + ([n for n in names[names.index(self.mode) + 1:]
                                         if SIMULATOR_MODES[n].supported(caps)] if self.cfg.mode == AUTO else [])
            for i, name in enumerate(candidates):
                try:
                    reading = SIMULATOR_MODES[name].value_reading(caps, self.cfg, split)
                except UnsupportedError as e:
                    if i == len(candidates) - 1:
                        raise
                    self.refused[name] = str(e)
                    continue
                if name != self.mode:
                    self.mode, self._mode = name, SIMULATOR_MODES[name]()
                self._mode.reading = self.reading = reading
                break
        assert self.reading is not None  # the last candidate either gave a reading or raised
        return self.reading

    async def simulate(self, explanation: str, token_lists: list[list[str]]) -> Simulation:
        """Predictions for every token of every record; several records per call if configured."""
        await self.prepare()
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
                    values = await self._mode.predict(self.backend, self.cfg, explanation, token_lists,
                                                      attempt=attempt.retry_state.attempt_number, spent=spent)
                finally:
                    for u in spent:
                        usage += u
                        self.usage += u
        return values, usage, calls
