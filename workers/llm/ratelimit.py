"""One rate limiter per provider+model, shared by every caller in the cluster.

Three layers, so the math is testable without Ray or a clock:
- `RateLimiter`: two token buckets (requests/min and tokens/min) with a pause-and-ramp after a 429. Pure
  arithmetic over an injected clock; `try_take` never sleeps, it says how long to wait.
- `RateLimiterActor`: the thin named Ray actor around it (one per provider+model, `get_if_exists=True`), and
  `InProcessLimiter`, the same async interface without Ray for laptop runs and tests.
- `LimiterClient`: what an LLM client holds. It takes permits from the shared limiter in batches (leases)
  and spends them locally, so the shared actor sees one call per ~0.1 s of traffic instead of one per request.

Tokens are reserved before a call (estimated prompt + max completion tokens) and settled against the real
usage afterwards: an unused reservation goes back into the caller's local pool, an overrun is a debt the next
lease pays. That is how providers that bill the reservation and refund afterwards (and our test server) count.
"""
from __future__ import annotations

import asyncio
import math
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol


@dataclass
class TokenBucket:
    """Continuous-refill bucket. `level` may go negative (a debt) when a caller overran its reservation."""
    rate_per_s: float
    capacity: float
    level: float
    updated: float

    def refill(self, now: float, factor: float) -> None:
        if now > self.updated:
            self.level = min(self.capacity, self.level + (now - self.updated) * self.rate_per_s * factor)
            self.updated = now

    def wait_for(self, amount: float, factor: float) -> float:
        """Seconds until `amount` is available (0 if now). An amount above capacity waits for a full bucket."""
        need = min(amount, self.capacity) - self.level
        return 0.0 if need <= 0 else need / (self.rate_per_s * factor)


@dataclass
class LimiterStats:
    granted_requests: int = 0
    granted_tokens: float = 0.0
    pauses: int = 0
    paused_until: float = 0.0
    factor: float = 1.0


@dataclass
class RateLimiter:
    """Requests/min and tokens/min buckets; after a 429, a pause for everyone, then half rate recovering to full.

    `headroom` < 1 runs slightly under the provider's limit so clock skew and the provider's own window
    quantisation do not turn into 429s. `burst_s` is how many seconds of traffic may go out back to back.
    """
    requests_per_minute: float
    tokens_per_minute: float
    headroom: float = 0.98
    burst_s: float = 0.5
    recover_s: float = 20.0  # from half rate back to full rate after a pause, linearly
    min_factor: float = 0.125
    clock: Callable[[], float] = time.monotonic
    stats: LimiterStats = field(default_factory=LimiterStats)

    def __post_init__(self) -> None:
        now = self.clock()
        rps = self.requests_per_minute / 60.0 * self.headroom
        tps = self.tokens_per_minute / 60.0 * self.headroom
        self.requests = TokenBucket(rps, max(1.0, rps * self.burst_s), max(1.0, rps * self.burst_s), now)
        self.tokens = TokenBucket(tps, max(1.0, tps * self.burst_s), max(1.0, tps * self.burst_s), now)
        self._pause_factor = 1.0  # rate factor right after the last pause ended
        self._recover_from = now  # when that ramp started

    def factor(self, now: float) -> float:
        """Current fraction of the full rate: 0 while paused, then ramping linearly back to 1."""
        if now < self.stats.paused_until:
            return 0.0
        ramp = (now - self._recover_from) / self.recover_s if self.recover_s > 0 else 1.0
        return min(1.0, self._pause_factor + (1.0 - self._pause_factor) * max(0.0, ramp))

    def _refill(self, now: float) -> float:
        f = self.factor(now)
        # refill up to the pause's end at the old rate, and nothing during it
        for bucket in (self.requests, self.tokens):
            # nothing refills during a pause
            bucket.updated = max(bucket.updated, min(now, self.stats.paused_until))
            bucket.refill(now, f)
        self.stats.factor = f
        return f

    def try_take(self, requests: int, tokens: float) -> float:
        """Take the permits and return 0, or take nothing and return the seconds to wait before asking again."""
        now = self.clock()
        f = self._refill(now)
        if f == 0.0:
            return self.stats.paused_until - now
        wait = max(self.requests.wait_for(requests, f), self.tokens.wait_for(tokens, f))
        if wait > 0:
            return wait
        self.requests.level -= requests
        self.tokens.level -= tokens
        self.stats.granted_requests += requests
        self.stats.granted_tokens += tokens
        return 0.0

    def give_back(self, requests: int, tokens: float) -> None:
        """Unused permits (a caller closing with a partly spent lease)."""
        self._refill(self.clock())
        self.requests.level = min(self.requests.capacity, self.requests.level + requests)
        self.tokens.level = min(self.tokens.capacity, self.tokens.level + tokens)

    def pause(self, seconds: float) -> None:
        """A 429: stop everyone for `seconds`, empty the buckets (no burst when it ends), then ramp back from
        half the rate we had (so repeated 429s back off geometrically down to `min_factor`)."""
        now = self.clock()
        f = self._refill(now)
        until = now + max(0.0, seconds)
        if until <= self.stats.paused_until:
            return  # the same throttling event reported by another caller
        if f == 0.0:  # already paused: the same event seen later by another caller; extend, do not halve again
            self.stats.paused_until = self._recover_from = until
            return
        self.stats.pauses += 1
        self.stats.paused_until = until
        self._pause_factor = max(self.min_factor, f / 2)
        self._recover_from = until
        self.requests.level = min(self.requests.level, 0.0)
        self.tokens.level = min(self.tokens.level, 0.0)


# --- async front ends: in-process and Ray ---------------------------------------------------------------------
class SharedLimiter(Protocol):
    async def lease(self, requests: int, tokens: float) -> float: ...
    async def pause(self, seconds: float) -> None: ...
    async def give_back(self, requests: int, tokens: float) -> None: ...


class AsyncLimiter:
    """`RateLimiter` behind an async FIFO: concurrent lease calls are granted in arrival order."""

    def __init__(self, limiter: RateLimiter):
        self.limiter = limiter
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def lease(self, requests: int, tokens: float) -> float:
        """Wait until the permits are granted; returns the seconds waited."""
        start = time.monotonic()
        async with self._lock():
            while (wait := self.limiter.try_take(requests, tokens)) > 0:
                await asyncio.sleep(min(wait, 1.0))
        return time.monotonic() - start

    async def pause(self, seconds: float) -> None:
        self.limiter.pause(seconds)

    async def give_back(self, requests: int, tokens: float) -> None:
        self.limiter.give_back(requests, tokens)

    async def stats(self) -> LimiterStats:
        return self.limiter.stats


_IN_PROCESS: dict[str, AsyncLimiter] = {}


def limiter_name(provider: str, model: str) -> str:
    return f"ratelimit:{provider}:{model}"


def in_process_limiter(provider: str, model: str, requests_per_minute: float, tokens_per_minute: float,
                       **kwargs) -> AsyncLimiter:
    """The process-wide limiter for provider+model (the laptop stand-in for the cluster-wide actor)."""
    name = limiter_name(provider, model)
    if name not in _IN_PROCESS:
        _IN_PROCESS[name] = AsyncLimiter(RateLimiter(requests_per_minute, tokens_per_minute, **kwargs))
    return _IN_PROCESS[name]


class RateLimiterActor:
    """Body of the named Ray actor; `ray_limiter` wraps it. State is soft: a restart starts with full buckets."""

    def __init__(self, requests_per_minute: float, tokens_per_minute: float, kwargs: dict | None = None):
        self.inner = AsyncLimiter(RateLimiter(requests_per_minute, tokens_per_minute, **(kwargs or {})))

    async def lease(self, requests: int, tokens: float) -> float:
        return await self.inner.lease(requests, tokens)

    async def pause(self, seconds: float) -> None:
        await self.inner.pause(seconds)

    async def give_back(self, requests: int, tokens: float) -> None:
        await self.inner.give_back(requests, tokens)

    async def stats(self) -> dict:
        s = self.inner.limiter.stats
        return {"granted_requests": s.granted_requests, "granted_tokens": s.granted_tokens,
                "pauses": s.pauses, "factor": s.factor}


class LimiterLostError(Exception):
    """The cluster-wide limiter actor is gone. The driver creates it and it lives as long as the driver, so its
    death means the driver died (or crashed it): a shard must stop without committing, not record its neurons as
    failed (a resume would then leave them failed)."""


class _RayHandleLimiter:
    """Adapts an actor handle to `SharedLimiter` (awaiting ObjectRefs inside the caller's event loop)."""

    def __init__(self, handle):
        self.handle = handle

    async def _call(self, method: str, *args):
        import ray

        try:
            return await getattr(self.handle, method).remote(*args)
        except ray.exceptions.RayActorError as e:
            raise LimiterLostError(f"the shared rate limiter is gone ({type(e).__name__}): its driver has "
                                   f"stopped") from e

    async def lease(self, requests: int, tokens: float) -> float:
        return await self._call("lease", requests, tokens)

    async def pause(self, seconds: float) -> None:
        await self._call("pause", seconds)

    async def give_back(self, requests: int, tokens: float) -> None:
        await self._call("give_back", requests, tokens)

    async def stats(self) -> dict:
        return await self._call("stats")


_RAY_HANDLES: dict[str, _RayHandleLimiter] = {}


def ray_limiter(provider: str, model: str, requests_per_minute: float, tokens_per_minute: float,
                **kwargs) -> _RayHandleLimiter:
    """Get or create the cluster-wide named limiter actor for provider+model (Ray must be initialised).

    The process that creates it owns it (not detached: it ends with the job), so the driver should call this
    once before starting the API actors; they then find it by name. Handles are kept for the process's life."""
    import ray

    name = limiter_name(provider, model)
    if name not in _RAY_HANDLES:
        actor_cls = ray.remote(RateLimiterActor)
        handle = actor_cls.options(name=name, get_if_exists=True, num_cpus=0, max_restarts=-1,
                                   max_concurrency=1000).remote(requests_per_minute, tokens_per_minute, kwargs)
        _RAY_HANDLES[name] = _RayHandleLimiter(handle)
    return _RAY_HANDLES[name]


# --- the caller's side: leases ----------------------------------------------------------------------------------
def lease_size(requests_per_minute: float, lease_s: float = 0.1, max_lease: int = 64) -> int:
    """Requests per lease: about `lease_s` of the whole limit, so the shared limiter sees ~1/lease_s calls/s."""
    return max(1, min(max_lease, int(requests_per_minute / 60.0 * lease_s)))


@dataclass
class Permit:
    tokens: float  # reserved; settle with the real usage
    waited_s: float


class LimiterClient:
    """A caller's local pool of leased permits. One per process/actor per provider+model."""

    def __init__(self, shared: SharedLimiter, *, requests_per_minute: float, lease_s: float = 0.1,
                 max_lease: int = 64):
        self.shared = shared
        self.lease_requests = lease_size(requests_per_minute, lease_s, max_lease)
        self.requests = 0
        self.tokens = 0.0
        self._locks: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()

    def _lock(self) -> asyncio.Lock:
        loop = asyncio.get_running_loop()
        lock = self._locks.get(loop)
        if lock is None:
            lock = self._locks[loop] = asyncio.Lock()
        return lock

    async def acquire(self, tokens: float) -> Permit:
        """One request's permit with `tokens` reserved; leases more from the shared limiter when short."""
        start = time.monotonic()
        async with self._lock():
            while self.requests < 1 or self.tokens < tokens:
                want_requests = self.lease_requests if self.requests < 1 else 0
                # enough tokens for the requests held after this lease at this request's size, less what the
                # pool already holds (settled refunds): never hoard beyond one lease's worth
                want_tokens = max(0.0, (self.requests + want_requests) * tokens - self.tokens)
                await self.shared.lease(want_requests, want_tokens)
                self.requests += want_requests
                self.tokens += want_tokens
            self.requests -= 1
            self.tokens -= tokens
        return Permit(tokens, time.monotonic() - start)

    def settle(self, permit: Permit, used_tokens: float) -> None:
        """Reconcile a reservation with the real usage: the unused part is spent by the next requests here."""
        self.tokens += permit.tokens - used_tokens

    async def throttled(self, retry_after_s: float) -> None:
        """The provider said 429: drop our leased requests (they were sized for a rate it refused) and pause
        the provider for every caller."""
        self.requests = 0
        await self.shared.pause(retry_after_s)

    async def aclose(self) -> None:
        if self.requests > 0 or self.tokens > 0:
            await self.shared.give_back(self.requests, max(0.0, self.tokens))
        self.requests, self.tokens = 0, 0.0


def estimate_tokens(text: str) -> int:
    """Conservative prompt-size estimate before a call (about 3 characters per token for English BPE, which
    over-reserves a little; the reservation is settled against the real usage after the call)."""
    return math.ceil(len(text) / 3) + 1
