"""Rate limiter math with a fake clock (hand-worked numbers), leases, and the named Ray actor shared by actors."""
import asyncio
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from workers.llm.ratelimit import LimiterClient, RateLimiter, estimate_tokens, lease_size, limiter_name


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def limiter(rpm=60, tpm=6000, **kw):
    clock = Clock()
    kw = {"headroom": 1.0, "burst_s": 2.0, **kw}
    return RateLimiter(rpm, tpm, clock=clock, **kw), clock


def test_requests_bucket_refills_at_the_rate():
    lim, clock = limiter()  # 1 request/s, 2 requests of burst; 100 tokens/s, 200 of burst
    assert lim.try_take(1, 50) == 0
    assert lim.try_take(1, 50) == 0
    assert lim.try_take(1, 50) == pytest.approx(1.0)  # requests bucket empty: one more in 1 s
    clock.t += 0.5
    assert lim.try_take(1, 50) == pytest.approx(0.5)
    clock.t += 0.5
    assert lim.try_take(1, 50) == 0
    assert lim.stats.granted_requests == 3 and lim.stats.granted_tokens == 150


def test_tokens_bucket_binds_when_requests_are_large():
    lim, clock = limiter()
    assert lim.try_take(1, 150) == 0  # 50 tokens left
    assert lim.try_take(1, 150) == pytest.approx(1.0)  # needs 100 more at 100/s
    clock.t += 1.0
    assert lim.try_take(1, 150) == 0


def test_request_larger_than_the_bucket_waits_for_a_full_bucket_then_leaves_a_debt():
    lim, clock = limiter()
    assert lim.try_take(1, 500) == 0  # full bucket (200) admits it; level -300
    assert lim.try_take(0, 10) == pytest.approx(3.1)  # (10 + 300) / 100
    lim.give_back(0, 100)  # unused reservation returned
    assert lim.try_take(0, 10) == pytest.approx(2.1)


def test_headroom_runs_under_the_provider_limit():
    lim, clock = limiter(rpm=6000, tpm=10**9, headroom=0.98, burst_s=1.0)
    granted = 0
    for _ in range(2000):  # 10 s in 5 ms steps
        clock.t += 0.005
        while lim.try_take(1, 1) == 0:
            granted += 1
    assert granted == pytest.approx(98 + 980, abs=2)  # burst of 98 plus 98/s for 10 s


def test_pause_stops_everyone_then_ramps_back_from_half_rate():
    lim, clock = limiter(recover_s=20.0)
    lim.pause(5.0)
    assert lim.try_take(1, 1) == pytest.approx(5.0)
    clock.t += 5.0
    assert lim.factor(clock.t) == pytest.approx(0.5)
    assert lim.try_take(1, 1) == pytest.approx(2.0)  # empty bucket, refilled at 0.5 request/s
    clock.t += 10.0
    assert lim.factor(clock.t) == pytest.approx(0.75)
    clock.t += 10.0
    assert lim.factor(clock.t) == pytest.approx(1.0)


def test_same_throttling_event_from_many_callers_halves_once_new_events_halve_again():
    lim, clock = limiter(recover_s=20.0, min_factor=0.2)
    lim.pause(2.0)
    clock.t += 0.5
    lim.pause(2.0)  # another caller's 429 of the same event: pause extended, rate not halved again
    assert lim.stats.pauses == 1
    clock.t += 2.0
    assert lim.factor(clock.t) == pytest.approx(0.5)
    lim.pause(1.0)
    lim.pause(0.1)  # shorter than the running pause: ignored
    clock.t += 1.0
    assert lim.factor(clock.t) == pytest.approx(0.25)
    lim.pause(1.0)
    clock.t += 1.0
    assert lim.factor(clock.t) == pytest.approx(0.2)  # floor
    assert lim.stats.pauses == 3


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 3), st.integers(1, 3), st.integers(1, 400)), min_size=1, max_size=60))
def test_never_grants_more_than_burst_plus_rate_times_time(steps):
    lim, clock = limiter()
    start = clock.t
    for dt, n, tokens in steps:
        clock.t += dt
        lim.try_take(n, tokens)
        elapsed = clock.t - start
        # burst + rate x time, plus the overshoot of one take larger than the bucket (admitted when full,
        # leaving a debt that blocks the next take): max(0, largest take - capacity)
        assert lim.stats.granted_requests <= 2 + 1.0 * elapsed + (3 - 2) + 1e-6
        assert lim.stats.granted_tokens <= 200 + 100 * elapsed + (400 - 200) + 1e-6


def test_lease_size_is_a_tenth_of_a_second_of_traffic():
    assert lease_size(6000) == 10
    assert lease_size(60) == 1
    assert lease_size(10**7) == 64


class CountingShared:
    def __init__(self):
        self.leases, self.pauses, self.returned = [], [], []

    async def lease(self, requests, tokens):
        self.leases.append((requests, tokens))
        return 0.0

    async def pause(self, seconds):
        self.pauses.append(seconds)

    async def give_back(self, requests, tokens):
        self.returned.append((requests, tokens))


def test_client_takes_permits_in_leases_and_settles_against_real_usage():
    shared = CountingShared()
    client = LimiterClient(shared, requests_per_minute=6000)  # leases of 10 requests

    async def run():
        for _ in range(30):
            permit = await client.acquire(100)
            client.settle(permit, 40)  # reserved 100, used 40: 60 stay in the local pool
        await client.throttled(2.5)
        assert client.requests == 0
        await client.aclose()

    asyncio.run(run())
    assert [r for r, _ in shared.leases if r] == [10, 10, 10]  # 30 requests, 3 calls to the shared limiter
    leased = sum(t for _, t in shared.leases)
    # the first lease reserves 10 x 100; each settle leaves 60 locally, so later requests need fewer new tokens
    assert leased < 30 * 100
    assert shared.pauses == [2.5]
    # everything leased was either used (30 x 40) or handed back on close
    assert leased - 30 * 40 == pytest.approx(sum(t for _, t in shared.returned))


def test_estimate_is_conservative_for_english():
    text = "The quick brown fox jumps over the lazy dog. " * 20
    assert estimate_tokens(text) >= len(text.split())


# --- Ray: several actors share one named limiter -----------------------------------------------------------------
def test_actors_share_the_named_limiter(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    class Caller:
        async def run(self, n):
            from workers.llm.ratelimit import LimiterClient, ray_limiter

            client = LimiterClient(ray_limiter("test", "m", 1200, 10**9), requests_per_minute=1200)
            stamps = []
            for _ in range(n):
                await client.acquire(1)
                stamps.append(time.monotonic())
            return stamps

    from workers.llm.ratelimit import ray_limiter

    ray_limiter("test", "m", 1200, 10**9)  # the driver creates (and so owns) the named limiter
    callers = [Caller.remote() for _ in range(3)]
    start = time.monotonic()
    stamps = sorted(s for batch in ray.get([c.run.remote(20) for c in callers]) for s in batch)
    elapsed = stamps[-1] - start
    # one limiter for all: 60 permits at 19.6/s after a burst of 9.8 -> at least (60 - 9.8 - lease) / 19.6 s
    assert elapsed >= (60 - 9.8 - 2) / 19.6 - 0.1
    actor = ray.get_actor(limiter_name("test", "m"))
    assert ray.get(actor.stats.remote())["granted_requests"] == 60


def test_a_limiter_gone_with_its_driver_stops_its_callers_with_limiter_lost(ray_local):
    """The limiter lives as long as the driver that created it; when it is gone a caller gets LimiterLostError
    (which stops a shard uncommitted), not Ray's ActorDiedError (which a shard recorded as its neuron's failure,
    so that a resume after a driver kill left a neuron failed that the uninterrupted run explained)."""
    from workers.llm.ratelimit import LimiterClient, LimiterLostError, ray_limiter

    client = LimiterClient(ray_limiter("gone", "m", 1200, 10**9), requests_per_minute=1200)
    asyncio.run(client.acquire(1))
    ray_local.kill(ray_local.get_actor(limiter_name("gone", "m")))
    with pytest.raises(LimiterLostError, match="the shared rate limiter is gone"):
        asyncio.run(client.acquire(10**6))  # more than any lease left: it must ask the actor
