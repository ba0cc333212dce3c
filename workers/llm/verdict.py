"""The method's word back to the LLM layer: was this answer usable?

The call journal stores a fresh answer as `pending` and hangs a hook on the response object. The method reads
the answer inside `judged(response)`:

    async with judged(resp):
        text = clean_explanation(resp.text)   # raises MalformedAnswerError on an unusable answer

Leaving the block normally marks the journal row `ok`. An `LLMError` raised inside it (MalformedAnswerError:
misaligned, truncated, empty) marks the row `rejected`, and the journal never replays a rejected answer, so a
retry after the endpoint is fixed asks again instead of failing on the stored one. Any other exception (a bug)
leaves the row pending: the next replay is judged afresh. A response that did not come through a journal has
no hook, and `judged` changes nothing.
"""
from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

from workers.llm.backends.base import LLMError

ACCEPTED, REJECTED = "ok", "rejected"
_HOOK = "_on_verdict"  # an attribute on the response instance, outside the dataclass fields (never stored)

T = TypeVar("T")


def attach(response: object, hook: Callable[[str], Awaitable[None]]) -> None:
    """Called by whoever stored the answer: `hook(ACCEPTED | REJECTED)` records the method's verdict."""
    setattr(response, _HOOK, hook)


async def tell(response: object, verdict: str) -> None:
    """Record `verdict` for `response`; a no-op for a response that no journal stored."""
    hook = getattr(response, _HOOK, None)
    if hook is not None:
        await hook(verdict)


@asynccontextmanager
async def judged(response: T) -> AsyncIterator[T]:
    """Accept `response` when the block completes, reject it when the block raises an LLMError."""
    try:
        yield response
    except LLMError:
        await tell(response, REJECTED)
        raise
    await tell(response, ACCEPTED)
