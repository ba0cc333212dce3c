"""Benchmark: how close do several Ray actors run to a provider's rate limit without being throttled?

Two test servers (loopback) enforce the same requests/min and tokens/min with real 429s, a lognormal latency
spread and reservation-based token accounting. Through each, `--actors` Ray actors send the same `--requests`
chat requests (random prompt sizes and answer lengths):
- ours: `LLMClient` with the one named cluster-wide `RateLimiter` actor (leases, reserve + settle, pause on 429)
  and tenacity retries honouring Retry-After;
- baseline, the way peers do it: a concurrency semaphore per actor + exponential backoff on 429, no shared
  limiter.
Utilisation is measured by the server over the middle 80% of successful responses (no start-up burst, no
tail): max(requests/min ÷ RPM, tokens/min ÷ TPM), i.e. against the binding limit.

    .venv/bin/python bench/ratelimit.py            # 2,000 requests each, 6,000 RPM / 2M TPM (~1 minute)
    .venv/bin/python bench/ratelimit.py --requests 3000 --rpm 600 --tpm 200000   # the issue's limits (slow)
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import ray  # noqa: E402

from schemas.config import Backend  # noqa: E402
from testing.testserver import Limits, Responder, TestServer, lognormal_latency  # noqa: E402

WORDS = ["neuron", "token", "fires", "on", "the", "word", "python", "class", "value", "list", "loop", "when"]
MAX_TOKENS = 100


class VariedAnswers(Responder):
    """Answers of 20..MAX_TOKENS words, fixed per prompt (as a real model's would be)."""

    def chat(self, messages, max_tokens):
        h = int(hashlib.sha256(messages[-1]["content"].encode()).hexdigest(), 16)
        return " ".join(["answer"] * (20 + h % (MAX_TOKENS - 19)))


def workload(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [f"request {i}: " + " ".join(rng.choice(WORDS) for _ in range(rng.randint(150, 450))) for i in range(n)]


@ray.remote(num_cpus=0)
class OursCaller:
    async def run(self, cfg_json: str, prompts: list[str]) -> dict:
        from workers.llm.backends.base import LLMError
        from workers.llm.client import make_client

        cfg = Backend.model_validate_json(cfg_json)
        statuses: dict[str, int] = {}
        client = make_client(cfg, env={}, role="bench", use_ray=True,
                             on_call=lambda e: statuses.__setitem__(e.status, statuses.get(e.status, 0) + 1))
        lost = 0

        async def one(p):
            nonlocal lost
            try:
                await client.chat([{"role": "user", "content": p}], max_tokens=MAX_TOKENS)
            except LLMError:
                lost += 1

        await asyncio.gather(*[one(p) for p in prompts])
        await client.aclose()
        return {"lost": lost, "statuses": statuses}


@ray.remote(num_cpus=0)
class BaselineCaller:
    """A semaphore and exponential backoff on 429 (Retry-After ignored), as the peers do it."""

    async def run(self, cfg_json: str, prompts: list[str], concurrency: int) -> dict:
        from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

        from workers.llm.backends.base import LLMError, RateLimitedError, TransientLLMError
        from workers.llm.backends.openai_compat import OpenAICompatBackend

        backend = OpenAICompatBackend(Backend.model_validate_json(cfg_json), env={})
        semaphore = asyncio.Semaphore(concurrency)
        lost = 0

        async def one(p):
            nonlocal lost
            try:
                async with semaphore:
                    async for attempt in AsyncRetrying(
                            stop=stop_after_attempt(6), wait=wait_random_exponential(multiplier=0.5, max=10),
                            retry=retry_if_exception_type((RateLimitedError, TransientLLMError)), reraise=True):
                        with attempt:
                            await backend.chat([{"role": "user", "content": p}], max_tokens=MAX_TOKENS)
            except LLMError:
                lost += 1

        await asyncio.gather(*[one(p) for p in prompts])
        await backend.aclose()
        return {"lost": lost}


def measure(server: TestServer, rpm: float, tpm: float) -> dict:
    ok = sorted((c for c in server.log if c.status == 200), key=lambda c: c.at)
    n429 = sum(1 for c in server.log if c.status == 429)
    lo, hi = int(len(ok) * 0.1), int(len(ok) * 0.9)
    window = ok[lo:hi]
    span = window[-1].at - window[0].at
    req_per_min = (len(window) - 1) / span * 60
    tok_per_min = sum(c.prompt_tokens + c.completion_tokens for c in window[1:]) / span * 60
    util = max(req_per_min / rpm, tok_per_min / tpm)
    return {"ok": len(ok), "responses": len(server.log), "429_fraction": n429 / max(1, len(server.log)),
            "req_per_min": req_per_min, "tok_per_min": tok_per_min, "utilization": util,
            "binding": "requests" if req_per_min / rpm >= tok_per_min / tpm else "tokens",
            "wall_s": ok[-1].at - ok[0].at if ok else 0.0}


def run_side(name: str, prompts: list[str], args, caller) -> tuple[dict, list[dict]]:
    limits = Limits(requests_per_minute=args.rpm, tokens_per_minute=args.tpm, burst_s=1.0)
    with TestServer(limits=limits, latency=lognormal_latency(args.median_latency, 0.6, seed=1),
                    responder=VariedAnswers()) as server:
        cfg = Backend(kind="openai", model=f"bench-{name}", base_url=server.base_url, api_key_env=None,
                      requests_per_minute=args.rpm, tokens_per_minute=args.tpm, concurrency=args.concurrency,
                      timeout_s=30, max_retries=8)
        if name == "ours":
            from workers.llm.client import shared_limiter_for

            shared_limiter_for(cfg, use_ray=True)  # the driver creates and owns the named limiter
        shares = [prompts[i::args.actors] for i in range(args.actors)]
        actors = [caller.remote() for _ in range(args.actors)]
        extra = () if name == "ours" else (args.concurrency,)
        results = ray.get([a.run.remote(cfg.model_dump_json(), s, *extra) for a, s in zip(actors, shares)])
        stats = measure(server, args.rpm, args.tpm)
    stats["lost"] = sum(r["lost"] for r in results)
    return stats, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=2000)
    ap.add_argument("--rpm", type=float, default=6000)
    ap.add_argument("--tpm", type=float, default=2_000_000)
    ap.add_argument("--actors", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=64, help="in-flight requests per actor")
    ap.add_argument("--median-latency", type=float, default=0.3)
    args = ap.parse_args()

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    prompts = workload(args.requests)
    print(f"{args.requests} requests per side, {args.actors} actors, limits {args.rpm:g} RPM / {args.tpm:g} TPM, "
          f"lognormal latency median {args.median_latency:g}s", flush=True)
    t = time.monotonic()
    ours, _ = run_side("ours", prompts, args, OursCaller)
    print(f"ours done in {time.monotonic() - t:.1f}s", flush=True)
    t = time.monotonic()
    base, _ = run_side("baseline", prompts, args, BaselineCaller)
    print(f"baseline done in {time.monotonic() - t:.1f}s", flush=True)
    ray.shutdown()

    print(f"{'':24}{'ours':>14}{'baseline':>14}")
    rows = [("utilisation (binding)", "utilization", "{:.3f}"), ("binding limit", "binding", "{}"),
            ("requests/min", "req_per_min", "{:.0f}"), ("tokens/min", "tok_per_min", "{:.0f}"),
            ("429 fraction", "429_fraction", "{:.4f}"), ("requests lost", "lost", "{}"),
            ("successful responses", "ok", "{}"), ("responses incl. 429", "responses", "{}"),
            ("wall time (s)", "wall_s", "{:.1f}")]
    for label, key, fmt in rows:
        print(f"{label:24}{fmt.format(ours[key]):>14}{fmt.format(base[key]):>14}")
    print(f"ratelimit_utilization={ours['utilization']:.3f}")


if __name__ == "__main__":
    main()
