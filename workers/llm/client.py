"""`LLMClient`: any LLMBackend plus the call journal, the shared rate limiter and retries. It is itself an
LLMBackend, so the explainer and simulator do not know whether they talk to a bare backend or to this.

Per call: journal hit -> answer (cached=True, not paid). Otherwise, per attempt: take a permit from the
limiter (reserving estimated prompt + max completion tokens), call with a per-request timeout, settle the
reservation against the real usage; a 429 pauses the provider for every caller. A backend that queues
requests itself (`queues_requests`, the in-process model) gets the timeout handed over instead
(workers/llm/service.py): it applies it to the model's work on the request, not to the request's wait for
the model, and it bounds how many requests it serves at once, so `concurrency` does not apply to it. tenacity
retries 429s and transient errors (5xx, timeouts, dropped connections, malformed/truncated responses) with jittered
exponential backoff, honouring Retry-After; permanent errors (400/401/403/404) are not retried. After the
last attempt the error is raised as an `LLMError` for the caller to record against its item. Identical
requests in flight at the same time share one call. Every attempt is reported to `on_call` as a `CallEvent`.
"""
from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import cast

from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from schemas.config import Backend
from schemas.failures import FailureReason
from workers.llm.backends.base import (
    BranchingBackend,
    Capabilities,
    ChatResponse,
    LLMBackend,
    LLMError,
    PermanentLLMError,
    PromptLogprobsResponse,
    RateLimitedError,
    TokensResponse,
    TransientLLMError,
    UnsupportedError,
    Usage,
)
from workers.llm.journal import CallJournal, endpoint_of, request_key
from workers.llm.ratelimit import LimiterClient, estimate_tokens, in_process_limiter, ray_limiter
from workers.llm.redact import redact_url
from workers.llm.service import REQUEST_TIMEOUT_S


@dataclass
class SharedCall:
    """A request in flight and how many callers await it: the last one to leave cancels it."""
    task: asyncio.Future
    waiters: int = 0


DEFAULT_RETRY_AFTER_S = 1.0  # a 429 without any Retry-After/x-ratelimit-reset header


@dataclass
class CallEvent:
    role: str  # "explainer" | "simulator" | ...
    provider: str
    model: str
    status: str  # ok | cached | 429 | 5xx | timeout | connection | malformed | transient | unsupported | error
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency_s: float = 0.0
    limiter_wait_s: float = 0.0
    attempt: int = 1
    final: bool = True  # the last event of this request (its outcome)
    key: str = ""  # journal key; the orchestrator collects these per shard for `CallJournal.rows_for`
    error: str | None = None


def status_of(exc: BaseException) -> str:
    if isinstance(exc, RateLimitedError):
        return "429"
    if isinstance(exc, UnsupportedError):
        return "unsupported"
    kind = getattr(exc, "kind", None)
    if kind:
        return kind
    if isinstance(exc, LLMError) and exc.status is not None and exc.status >= 500:
        return "5xx"
    if isinstance(exc, TransientLLMError):
        return "transient"
    return "error"


class LLMClient:
    def __init__(self, backend: LLMBackend, *, role: str = "llm", limiter: LimiterClient | None = None,
                 journal: CallJournal | None = None, max_retries: int = 5, timeout_s: float = 60.0,
                 concurrency: int | None = None, on_call: Callable[[CallEvent], None] | None = None,
                 backoff_initial_s: float = 0.5, backoff_max_s: float = 30.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep):
        self.backend = backend
        self.role = role
        self.limiter = limiter
        self.journal = journal
        self.max_retries = max_retries
        self.timeout_s = timeout_s
        self.on_call = on_call
        self._backoff = wait_random_exponential(multiplier=backoff_initial_s, max=backoff_max_s)
        self._sleep = sleep
        self._concurrency = concurrency
        self._semaphores: dict[asyncio.AbstractEventLoop, asyncio.Semaphore] = {}
        self._inflight: dict[str, SharedCall] = {}
        self._queues = bool(getattr(backend, "queues_requests", False))

    # --- the LLMBackend protocol ------------------------------------------------------------------------------
    @property
    def provider(self) -> str:
        return self.backend.provider

    @property
    def model(self) -> str:
        return self.backend.model

    @property
    def capabilities(self) -> Capabilities:
        return self.backend.capabilities

    async def probe_capabilities(self) -> Capabilities:
        probe = getattr(self.backend, "probe_capabilities", None)
        return await probe(via=self) if probe else self.backend.capabilities

    async def chat(self, messages: list[dict], *, max_tokens: int, temperature: float = 0.0,
                   top_logprobs: int | None = None, seed: int | None = None) -> ChatResponse:
        request = {"op": "chat", "messages": messages, "max_tokens": max_tokens, "temperature": temperature,
                   "top_logprobs": top_logprobs, "seed": seed}
        prompt_estimate = sum(estimate_tokens(str(m.get("content", ""))) + 4 for m in messages)
        return await self._request(request, prompt_estimate + max_tokens, lambda: self.backend.chat(
            messages, max_tokens=max_tokens, temperature=temperature, top_logprobs=top_logprobs, seed=seed))

    async def prompt_logprobs(self, prompt: str, offsets: list[int], *, top_k: int,
                              branch: str | None = None) -> PromptLogprobsResponse:
        request = {"op": "prompt_logprobs", "prompt": prompt, "offsets": list(offsets), "top_k": top_k}
        if branch is None:  # a request without a branch keeps the key it had before branches existed
            return await self._request(request, estimate_tokens(prompt) + 1,
                                       lambda: self.backend.prompt_logprobs(prompt, offsets, top_k=top_k))
        branching = cast(BranchingBackend, self.backend)  # the simulator asks for a branch only with prompt_branches
        return await self._request({**request, "branch": branch}, estimate_tokens(prompt) + len(offsets) + 1,
                                   lambda: branching.prompt_logprobs(prompt, offsets, top_k=top_k, branch=branch))

    async def tokenize(self, text: str) -> list[str]:
        """The backend's tokens of `text`. An endpoint answers it with a paid echo call, so it goes through the
        journal, the limiter and the retries like every other request."""
        tokenize = getattr(self.backend, "tokenize", None)
        if tokenize is None:
            raise UnsupportedError(f"backend {self.provider}/{self.model} cannot show its tokenization")

        async def call() -> TokensResponse:
            tokens = await tokenize(text)
            return TokensResponse(tokens=tokens, usage=Usage(prompt_tokens=len(tokens)))

        response = await self._request({"op": "tokenize", "text": text}, estimate_tokens(text) + 1, call)
        return response.tokens

    async def aclose(self) -> None:
        if self.limiter is not None:
            await self.limiter.aclose()
        await self.backend.aclose()

    # --- machinery ----------------------------------------------------------------------------------------------
    async def _request(self, request: dict, reserve_tokens: int, call: Callable[[], Awaitable]):
        key = request_key(self.provider, self.model, request, endpoint=endpoint_of(self.backend))
        if self.journal is not None:
            hit = await asyncio.to_thread(self.journal.get, key)
            if hit is not None:
                self._emit("cached", key, usage=hit.usage)
                return hit
        # The call runs in a task of its own that every caller of the same request awaits (shielded): the
        # cancellation of one caller (its neuron's deadline) never reaches the others. The last caller to
        # leave cancels the call.
        shared = self._inflight.get(key)
        if shared is None:
            shared = SharedCall(asyncio.ensure_future(self._with_retries(key, reserve_tokens, call)))
            self._inflight[key] = shared
            this = shared

            def forget(_task: asyncio.Future) -> None:
                if self._inflight.get(key) is this:
                    self._inflight.pop(key)
            shared.task.add_done_callback(forget)
        shared.waiters += 1
        try:
            return await asyncio.shield(shared.task)
        finally:
            shared.waiters -= 1
            if shared.waiters == 0 and not shared.task.done():
                self._inflight.pop(key, None)  # a new caller must not join a call being cancelled
                shared.task.cancel()

    async def _with_retries(self, key: str, reserve_tokens: int, call: Callable[[], Awaitable]):
        retrying = AsyncRetrying(stop=stop_after_attempt(self.max_retries + 1), wait=self._wait,
                                 retry=retry_if_exception(lambda e: isinstance(e, LLMError) and e.retryable),
                                 sleep=self._sleep, reraise=True)
        attempt_no = 0
        async for attempt in retrying:
            with attempt:
                attempt_no += 1
                return await self._attempt(key, reserve_tokens, call, attempt_no)

    def _wait(self, state) -> float:
        exc = state.outcome.exception()
        retry_after = getattr(exc, "retry_after_s", None)
        if retry_after is not None:  # the provider said when; a little jitter so callers do not return in step
            return retry_after + random.uniform(0, 0.1 * retry_after + 0.05)
        return self._backoff(state)

    def _semaphore(self) -> asyncio.Semaphore | None:
        if self._concurrency is None or self._queues:
            return None
        loop = asyncio.get_running_loop()
        if loop not in self._semaphores:
            self._semaphores = {loop: asyncio.Semaphore(self._concurrency)}
        return self._semaphores[loop]

    async def _attempt(self, key: str, reserve_tokens: int, call: Callable[[], Awaitable], attempt_no: int):
        semaphore = self._semaphore()
        if semaphore is not None:
            await semaphore.acquire()
        try:
            limiter = self.limiter
            permit = await limiter.acquire(reserve_tokens) if limiter else None
            waited = permit.waited_s if permit else 0.0
            start = time.monotonic()
            try:
                if self._queues:
                    timeout = REQUEST_TIMEOUT_S.set(self.timeout_s)
                    try:
                        response = await call()
                    finally:
                        REQUEST_TIMEOUT_S.reset(timeout)
                else:
                    response = await asyncio.wait_for(call(), self.timeout_s)
            except BaseException as e:
                latency = time.monotonic() - start
                err = self._as_llm_error(e)
                if permit is not None and limiter is not None:
                    # a refused request used no tokens; for other failures assume the reservation was spent
                    limiter.settle(permit, 0 if isinstance(err, RateLimitedError) else permit.tokens)
                    if isinstance(err, RateLimitedError):
                        await limiter.throttled(err.retry_after_s or DEFAULT_RETRY_AFTER_S)
                if err is None:
                    raise
                final = not err.retryable or attempt_no > self.max_retries
                self._emit(status_of(err), key, latency=latency, waited=waited, attempt=attempt_no, final=final,
                           error=str(err))
                if err is e:
                    raise
                raise err from None
            latency = time.monotonic() - start
            if permit is not None and limiter is not None:
                limiter.settle(permit, response.usage.prompt_tokens + response.usage.completion_tokens)
        finally:
            if semaphore is not None:
                semaphore.release()
        if self.journal is not None:
            await asyncio.to_thread(self.journal.put, key, response, provider=self.provider, model=self.model,
                                    latency_s=latency)
        self._emit("ok", key, usage=response.usage, latency=latency, waited=waited, attempt=attempt_no)
        return response

    def _as_llm_error(self, e: BaseException) -> LLMError | None:
        """The error to retry or record; None for cancellation (propagates untouched)."""
        if isinstance(e, LLMError):
            return e
        if isinstance(e, (asyncio.TimeoutError, TimeoutError)):
            err = TransientLLMError(f"{self.model}: no answer within {self.timeout_s:g}s",
                                    reason=FailureReason.TIMEOUT)
            err.kind = "timeout"
            return err
        if isinstance(e, Exception):  # a backend bug must fail the item, not the sweep
            return PermanentLLMError(f"{self.model}: {type(e).__name__}: {e}", reason=FailureReason.ERROR)
        return None

    def _emit(self, status: str, key: str, *, usage=None, latency: float = 0.0, waited: float = 0.0,
              attempt: int = 1, final: bool = True, error: str | None = None) -> None:
        if self.on_call is None:
            return
        self.on_call(CallEvent(role=self.role, provider=self.provider, model=self.model, status=status,
                               prompt_tokens=usage.prompt_tokens if usage else 0,
                               completion_tokens=usage.completion_tokens if usage else 0,
                               latency_s=latency, limiter_wait_s=waited, attempt=attempt, final=final, key=key,
                               error=error))


def shared_limiter_for(cfg: Backend, *, use_ray: bool | None = None):
    """The cluster-wide named actor when Ray is up (or asked for), else the process-wide in-process one."""
    if use_ray is None:
        try:
            import ray
            use_ray = ray.is_initialized()
        except ImportError:
            use_ray = False
    make = ray_limiter if use_ray else in_process_limiter
    # the provider is the endpoint: two servers of the same model have separate limits
    provider = redact_url(cfg.base_url or "https://api.openai.com/v1") if cfg.kind == "openai" else cfg.kind
    return make(provider, cfg.model, cfg.requests_per_minute, cfg.tokens_per_minute)


def make_client(cfg: Backend, *, env: Mapping[str, str], role: str, journal: CallJournal | None = None,
                on_call: Callable[[CallEvent], None] | None = None, use_ray: bool | None = None,
                backend: LLMBackend | None = None) -> LLMClient:
    """The configured backend wrapped with journal, retries and (for remote endpoints) the shared limiter."""
    from workers.llm.backends import make_backend

    backend = backend or make_backend(cfg, env=env)
    limiter = None
    if cfg.kind != "local":
        limiter = LimiterClient(shared_limiter_for(cfg, use_ray=use_ray), requests_per_minute=cfg.requests_per_minute)
    return LLMClient(backend, role=role, limiter=limiter, journal=journal, max_retries=cfg.max_retries,
                     timeout_s=cfg.timeout_s, concurrency=cfg.concurrency, on_call=on_call)
