"""The contract every LLM backend (local model, OpenAI-compatible endpoint) and every wrapper around one
(rate limiter, retries, journal) satisfies. The explainer, simulator and scorers see only this.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from schemas.failures import FailureReason


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def __add__(self, other: Usage) -> Usage:
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
    # asked with `branch` (Capabilities.prompt_branches): per offset, the top-k after the prompt's tokens before
    # that offset followed by the branch's one token; None where the branch token is not in that position's top-k
    branches: list[dict[str, float] | None] | None = None


@dataclass
class TokensResponse:
    """How the backend's tokenizer splits a text (`LLMClient.tokenize`): the token strings in order. An
    endpoint learns it through a paid echo call, so the answer is journaled like any other."""
    tokens: list[str]
    usage: Usage
    cached: bool = False


@dataclass(frozen=True)
class Capabilities:
    chat: bool = True
    chat_logprobs: bool = False  # chat completions return top_logprobs of generated tokens
    prompt_logprobs: bool = False  # next-token logprobs at chosen prompt positions (local, or echo+logprobs)
    prompt_branches: bool = False  # prompt_logprobs(..., branch=...) also gives the distribution one token on


class LLMError(Exception):
    """Base of every backend failure. `retryable` tells the retry policy what to do; `reason` is the bounded
    failure reason the ledger and metrics record (a class default, or the one given where it is raised)."""
    retryable = False
    reason: FailureReason = FailureReason.ERROR
    kind: str | None = None  # a finer status for the metrics label ("timeout", "connection", "malformed")
    retry_after_s: float | None = None  # when the provider said when to come back

    def __init__(self, message: str, *, status: int | None = None, reason: FailureReason | None = None):
        super().__init__(message)
        self.status = status
        if reason is not None:
            self.reason = reason


class RateLimitedError(LLMError):
    retryable = True
    reason = FailureReason.RATE_LIMITED

    def __init__(self, message: str, *, retry_after_s: float | None = None, status: int | None = 429,
                 reason: FailureReason | None = None):
        super().__init__(message, status=status, reason=reason)
        self.retry_after_s = retry_after_s


class TransientLLMError(LLMError):
    """5xx, timeouts, dropped connections, malformed or truncated responses: worth another try. The reason is
    SERVER_ERROR unless it is raised with another (TIMEOUT, CONNECTION, MALFORMED)."""
    retryable = True
    reason = FailureReason.SERVER_ERROR


class PermanentLLMError(LLMError):
    """400/401/403/404 and anything else a retry cannot fix."""
    retryable = False
    reason = FailureReason.PERMANENT


class UnsupportedError(PermanentLLMError):
    """The backend cannot do what was asked (e.g. prompt logprobs on a chat-only endpoint)."""


@runtime_checkable
class LLMBackend(Protocol):
    # read-only properties, so that wrappers (LLMClient) which forward them from the backend they wrap also
    # satisfy the contract; a plain attribute on a backend satisfies a read-only property too
    @property
    def provider(self) -> str: ...  # "local", "openai", ... (a metrics label)

    @property
    def model(self) -> str: ...

    @property
    def capabilities(self) -> Capabilities: ...

    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   top_logprobs: int | None = None, seed: int | None = None) -> ChatResponse: ...

    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int) -> PromptLogprobsResponse: ...
    # A backend with `capabilities.prompt_branches` also takes `branch: str | None = None`, a text that is one
    # token of its model, and fills `PromptLogprobsResponse.branches` (the simulator reads P("0" | ..."1") so,
    # where the tokenizer writes "10" as "1" + "0"; docs/method.md §5). A backend may also offer
    # `async tokenize(text) -> list[str]`, the strings of the tokens its model reads `text` as.

    async def aclose(self) -> None: ...


@runtime_checkable
class BranchingBackend(Protocol):
    """A backend with `Capabilities.prompt_branches`: prompt logprobs that also return, per offset, the next-token
    top-k after the branch token (the local backend; docs/method.md §5, the value 10)."""

    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int,
                              branch: str | None = None) -> PromptLogprobsResponse: ...
