"""What a simulator mode is (docs/method.md §5): a way to turn one explanation and some records' tokens into
one predicted activation (0-10) per token, given what the backend can do."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from schemas.config import Simulator as SimulatorConfig
from workers.llm.backends.base import Capabilities, ChatResponse, LLMBackend, Usage
from workers.method.prompts import simulator_chat_messages, simulator_max_tokens
from workers.method.retrying import sample_settings
from workers.method.simulator.values import TEN_FROM_TEXT, ValueReading


class SimulatorMode(ABC):
    """One mode. `predict` makes one attempt for a chunk of records; the caller retries a
    MalformedAnswerError with another sample (`attempt` numbers the tries, from 1). `reading` is set by the
    caller (from `value_reading`) before the first `predict`."""

    name: ClassVar[str]
    uses_logprobs: ClassVar[bool] = True  # whether `simulator.top_logprobs` shapes the prediction
    ten_from: ClassVar[str] = TEN_FROM_TEXT  # how the mode reads the value 10 (simulator/values.py)
    reading: ValueReading = ValueReading(TEN_FROM_TEXT)

    @staticmethod
    @abstractmethod
    def supported(caps: Capabilities) -> bool:
        """Whether a backend with these capabilities can run this mode."""

    @classmethod
    def value_reading(cls, caps: Capabilities, cfg: SimulatorConfig, digits_split: bool | None) -> ValueReading:
        """How this mode reads values from a backend whose tokenizer writes "10" as "1" + "0" (`digits_split`
        True), as one token (False) or cannot tell (None); UnsupportedError if it cannot read them right."""
        return ValueReading(cls.ten_from, digits_split, cfg.spaced_digits)

    @abstractmethod
    async def predict(self, backend: LLMBackend, cfg: SimulatorConfig, explanation: str,
                      token_lists: list[list[str]], *, attempt: int, spent: list[Usage]) -> list[list[float]]:
        """One prediction per token per record; every call's usage goes to `spent` before its answer is
        parsed, so a malformed answer is still counted."""


async def ask_chat(backend: LLMBackend, cfg: SimulatorConfig, explanation: str, token_lists: list[list[str]], *,
                   attempt: int, spent: list[Usage], logprobs: bool) -> ChatResponse:
    """The chat modes' request: the records as `token<TAB>value` lines to fill in (docs/method.md §5)."""
    temperature, seed = sample_settings(0.0, attempt)
    resp = await backend.chat(simulator_chat_messages(explanation, token_lists),
                              max_tokens=simulator_max_tokens(token_lists), temperature=temperature,
                              top_logprobs=cfg.top_logprobs if logprobs else None, seed=seed)
    spent.append(resp.usage)
    return resp
