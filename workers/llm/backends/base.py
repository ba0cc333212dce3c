"""The contract every LLM backend (local model, OpenAI-compatible endpoint) and every wrapper around one
(rate limiter, retries, journal) satisfies. The explainer, simulator and scorers see only this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: "Usage") -> "Usage":
        return Usage(self.prompt_tokens + other.prompt_tokens, self.completion_tokens + other.completion_tokens)


@dataclass
class TokenAlternatives:
    """One generated token and the top log-probabilities offered at its position (token string -> logprob)."""
    token: str
    logprob: float
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class ChatResponse:
    text: str
    usage: Usage
    logprobs: list[TokenAlternatives] | None = None  # one per generated token, when asked for and served
    cached: bool = False  # answered from the call journal, not paid for


@dataclass
class PromptLogprobsResponse:
    """For each requested character offset in the prompt: the top-k log-probabilities of the token that
    the model predicts there (i.e. the next-token distribution given the prompt text before that offset).
    Token strings are as the tokenizer decodes them (may carry a leading space)."""
    positions: list[dict[str, float]]
    usage: Usage
    cached: bool = False


@dataclass(frozen=True)
class Capabilities:
    chat: bool = True
    chat_logprobs: bool = False  # chat completions return top_logprobs of generated tokens
    prompt_logprobs: bool = False  # next-token logprobs at chosen prompt positions (local, or echo+logprobs)


class LLMError(Exception):
    """Base of every backend failure. `retryable` tells the retry policy what to do."""
    retryable = False

    def __init__(self, message: str, *, status: int | None = None):
        super().__init__(message)
        self.status = status


class RateLimitedError(LLMError):
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None, status: int | None = 429):
        super().__init__(message, status=status)
        self.retry_after_s = retry_after_s


class TransientLLMError(LLMError):
    """5xx, timeouts, dropped connections, malformed or truncated responses: worth another try."""
    retryable = True


class PermanentLLMError(LLMError):
    """400/401/403/404 and anything else a retry cannot fix."""
    retryable = False


class UnsupportedError(PermanentLLMError):
    """The backend cannot do what was asked (e.g. prompt logprobs on a chat-only endpoint)."""


@runtime_checkable
class LLMBackend(Protocol):
    provider: str  # "local", "openai", ... (a metrics label)
    model: str
    capabilities: Capabilities

    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   top_logprobs: int | None = None, seed: int | None = None) -> ChatResponse: ...

    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int) -> PromptLogprobsResponse: ...

    async def aclose(self) -> None: ...
