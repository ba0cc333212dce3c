"""An OpenAI-compatible HTTP server on 127.0.0.1 for tests and benchmarks (FastAPI + uvicorn in a thread).

It serves /v1/chat/completions (with logprobs/top_logprobs) and /v1/completions (echo + logprobs with
text_offset), enforces requests/min and tokens/min with real 429s and Retry-After, sleeps a configurable
latency, injects faults on demand (with the response headers a test chooses, e.g. a long Retry-After),
counts requests per request body (so a test can assert "no call was paid twice"), and answers through a
pluggable `Responder`. A chat answer longer than `max_tokens` is cut there with `finish_reason: length`, as
real servers do. Every response carries a `Date` from the server's clock, which `clock_skew_s` sets apart
from this machine's.

    with TestServer(limits=Limits(requests_per_minute=600)) as server:
        server.inject("500", times=2)
        server.inject("429", headers={"retry-after": "86400"})
        ... OpenAI client at server.base_url ...
        assert max(server.served.values()) == 1

Tokens are words with their leading whitespace (`TOKEN_RE`). Tokens/min is charged the way reservation-based
providers do it: prompt tokens + max_tokens at admission, the unused completion part refunded after.
"""
from __future__ import annotations

import asyncio
import collections
import email.utils
import hashlib
import json
import math
import random
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

TOKEN_RE = re.compile(r"\s*\S+|\s+")
FAULTS = ("500", "503", "429", "hang", "drop", "malformed", "truncated", "missing_logprobs")


def tokenize(text: str) -> list[tuple[str, int]]:
    """(token, character offset) pairs: each word with the whitespace before it."""
    return [(m.group(), m.start()) for m in TOKEN_RE.finditer(text)]


def request_key(path: str, body: dict) -> str:
    return hashlib.sha256((path + json.dumps(body, sort_keys=True, separators=(",", ":"))).encode()).hexdigest()


class Responder:
    """What the server answers. Subclass to make a stub model answer realistically (e.g. the simulator's
    rule-following stub): `chat` returns the answer text, `top_logprobs` the alternatives at a position."""

    alternatives = (" the", " a", " 0", " 1", " 2", " 3", " 4", " 5", " 6", " 7", " 8", " 9", " 10",
                    " and", " of", " to", " in", " is", " unknown", " ok")

    def chat(self, messages: list[dict], max_tokens: int) -> str:
        last = messages[-1]["content"] if messages else ""
        return f" Answer about {len(str(last))} characters: words and numbers."

    def top_logprobs(self, context: str, token: str, k: int) -> dict[str, float]:
        """Top-k next-token logprobs given `context`; `token` is the one that actually follows (if any)."""
        top = {token: -0.25} if token else {}
        for i, alt in enumerate(self.alternatives):
            if len(top) >= k:
                break
            top.setdefault(alt, -1.5 - 0.5 * i)
        return top


@dataclass
class Limits:
    requests_per_minute: float | None = None
    tokens_per_minute: float | None = None
    burst_s: float = 1.0  # the bucket holds this many seconds of the rate (providers quantise per second)


def fixed_latency(seconds: float) -> Callable[[], float]:
    return lambda: seconds


def lognormal_latency(median_s: float, sigma: float = 0.5, *, cap_s: float = 10.0, seed: int = 0
                      ) -> Callable[[], float]:
    """A realistic latency spread: most calls near the median, a long tail."""
    rng = random.Random(seed)
    return lambda: min(cap_s, median_s * math.exp(rng.gauss(0.0, sigma)))


class _Bucket:
    """The server's own bucket (deliberately not the client's code, so the server is an independent judge)."""

    def __init__(self, per_minute: float, burst_s: float):
        self.rate = per_minute / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.level = self.capacity
        self.t = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.t) * self.rate)
        self.t = now

    def shortfall_s(self, amount: float) -> float:
        self._refill()
        need = min(amount, self.capacity) - self.level
        return max(0.0, need / self.rate)

    def take(self, amount: float) -> None:
        self.level -= amount

    def refund(self, amount: float) -> None:
        self._refill()
        self.level = min(self.capacity, self.level + amount)


@dataclass
class ServedCall:
    at: float
    path: str
    status: int
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class TestServer:
    limits: Limits = field(default_factory=Limits)
    latency: Callable[[], float] = field(default_factory=lambda: fixed_latency(0.0))
    responder: Responder = field(default_factory=Responder)
    fault_rates: dict[str, float] = field(default_factory=dict)  # random faults, e.g. {"500": 0.05}
    hang_s: float = 30.0
    seed: int = 0
    clock_skew_s: float = 0.0  # the server's clock (its Date header) minus this machine's
    __test__ = False  # not a pytest test class

    def __post_init__(self) -> None:
        self.calls: collections.Counter[str] = collections.Counter()  # every request, by request key
        self.served: collections.Counter[str] = collections.Counter()  # 200 OK well-formed answers, by key
        self.log: list[ServedCall] = []
        self._faults: collections.deque[tuple[str, str | None, dict | None]] = collections.deque()
        self._faults_lock = threading.Lock()
        self._rng = random.Random(self.seed)
        self._req_bucket = _Bucket(self.limits.requests_per_minute, self.limits.burst_s) \
            if self.limits.requests_per_minute else None
        self._tok_bucket = _Bucket(self.limits.tokens_per_minute, self.limits.burst_s) \
            if self.limits.tokens_per_minute else None
        self.app = self._build_app()
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.port = 0

    # --- control from the test --------------------------------------------------------------------------
    def inject(self, fault: str, times: int = 1, path: str | None = None, headers: dict[str, str] | None = None
               ) -> None:
        """The next `times` requests (to `path`, e.g. "/v1/completions", or any) get `fault`. `headers` go on
        the faulty response; for a 429 they replace the default Retry-After headers."""
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r} (allowed: {', '.join(FAULTS)})")
        with self._faults_lock:
            self._faults.extend([(fault, path, headers)] * times)

    def now(self) -> float:
        """The server's clock (Unix time), as its Date header shows it."""
        return time.time() + self.clock_skew_s

    def requests_to(self, path: str) -> int:
        """Requests received at `path` (e.g. "/v1/completions"), whatever their answer."""
        return sum(1 for c in self.log if c.path == path)

    def status_counts(self) -> collections.Counter[int]:
        return collections.Counter(c.status for c in self.log)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    # --- lifecycle ----------------------------------------------------------------------------------------
    def start(self) -> TestServer:
        config = uvicorn.Config(self.app, host="127.0.0.1", port=0, log_level="critical", access_log=False,
                                timeout_graceful_shutdown=1, lifespan="off", backlog=4096,
                                date_header=False)  # ours, on the server's clock
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, name="testserver", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("test server did not start")
            time.sleep(0.01)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
            if self._thread is not None:
                self._thread.join(timeout=10)
            self._server = None

    def __enter__(self) -> TestServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- the app ------------------------------------------------------------------------------------------
    def _next_fault(self, path: str) -> tuple[str | None, dict | None]:
        with self._faults_lock:
            for i, (fault, p, headers) in enumerate(self._faults):
                if p is None or p == path:
                    del self._faults[i]
                    return fault, headers
        for fault, rate in self.fault_rates.items():
            if self._rng.random() < rate:
                return fault, None
        return None, None

    def _date(self) -> dict[str, str]:
        return {"date": email.utils.formatdate(self.now(), usegmt=True)}

    def _admit(self, charge: float) -> float:
        """0 if admitted (and charged), else the seconds until it would be."""
        wait = max(self._req_bucket.shortfall_s(1) if self._req_bucket else 0.0,
                   self._tok_bucket.shortfall_s(charge) if self._tok_bucket else 0.0)
        if wait > 0:
            return wait
        if self._req_bucket:
            self._req_bucket.take(1)
        if self._tok_bucket:
            self._tok_bucket.take(charge)
        return 0.0

    def _build_app(self) -> FastAPI:
        app = FastAPI()

        async def handle(request: Request, build: Callable[[dict, bool], tuple[dict, int, int]]) -> Response:
            path = request.url.path
            body = await request.json()
            key = request_key(path, body)
            self.calls[key] += 1
            fault, fault_headers = self._next_fault(path)
            date = self._date()
            prompt_text = _prompt_text(body)
            prompt_tokens = len(tokenize(prompt_text)) + 3 * len(body.get("messages", []))
            max_tokens = _max_tokens(body)
            wait = 1.0 if fault == "429" else self._admit(prompt_tokens + max_tokens)
            if wait > 0:
                self.log.append(ServedCall(time.monotonic(), path, 429))
                if fault == "429" and fault_headers is not None:
                    return _rate_limited(wait, {**date, **fault_headers})
                return _rate_limited(wait, {**date, **_retry_after_headers(wait)})
            if fault == "hang":
                await asyncio.sleep(self.hang_s)
            delay = self.latency()
            if delay > 0:
                await asyncio.sleep(delay)
            if fault in ("500", "503"):
                self.log.append(ServedCall(time.monotonic(), path, int(fault)))
                return JSONResponse({"error": {"message": "injected server error", "type": "server_error"}},
                                    status_code=int(fault), headers={**date, **(fault_headers or {})})
            payload, completion_tokens, unused = build(body, fault == "missing_logprobs")
            if self._tok_bucket and unused > 0:
                self._tok_bucket.refund(unused)
            payload["usage"] = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                                "total_tokens": prompt_tokens + completion_tokens}
            raw = json.dumps(payload).encode()
            status_logged = 200
            if fault == "malformed":
                raw, status_logged = b"<html>upstream proxy error</html>", 299
            elif fault == "truncated":
                raw, status_logged = raw[: len(raw) // 2], 299
            elif fault == "drop":
                self.log.append(ServedCall(time.monotonic(), path, 599))
                return _DroppedResponse(raw)
            elif fault is None:
                self.served[key] += 1
            self.log.append(ServedCall(time.monotonic(), path, status_logged, prompt_tokens, completion_tokens))
            return Response(raw, media_type="application/json", headers=date)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await handle(request, self._chat)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await handle(request, self._completions)

        @app.get("/v1/models")
        async def models() -> dict:
            return {"object": "list", "data": [{"id": "test-model", "object": "model", "owned_by": "test"}]}

        return app

    def _chat(self, body: dict, drop_logprobs: bool) -> tuple[dict, int, int]:
        max_tokens = _max_tokens(body)
        answer = tokenize(self.responder.chat(body.get("messages", []), max_tokens))
        finish = "length" if len(answer) > max_tokens else "stop"
        answer = answer[:max_tokens]
        text = "".join(t for t, _ in answer)
        choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish,
                        "logprobs": None}
        if body.get("logprobs") and not drop_logprobs:
            k = int(body.get("top_logprobs") or 0)
            context = _prompt_text(body)
            content = []
            for tok, off in answer:
                top = self.responder.top_logprobs(context + text[:off], tok, max(k, 1))
                content.append({"token": tok, "logprob": top.get(tok, -10.0), "bytes": list(tok.encode()),
                                "top_logprobs": [{"token": t, "logprob": lp, "bytes": list(t.encode())}
                                                 for t, lp in list(top.items())[:k]]})
            choice["logprobs"] = {"content": content}
        payload = {"id": "chatcmpl-test", "object": "chat.completion", "created": int(time.time()),
                   "model": body.get("model", "test-model"), "choices": [choice]}
        return payload, len(answer), max_tokens - len(answer)

    def _completions(self, body: dict, drop_logprobs: bool) -> tuple[dict, int, int]:
        prompt = body.get("prompt", "")
        prompt = prompt[0] if isinstance(prompt, list) else prompt
        max_tokens = _max_tokens(body)
        generated = tokenize(self.responder.chat([{"role": "user", "content": prompt}], max_tokens))[:max_tokens] \
            if max_tokens > 0 else []  # an echo of the prompt alone generates nothing: nothing to ask
        gen_text = "".join(t for t, _ in generated)
        echo = bool(body.get("echo"))
        full = prompt + gen_text
        # text_offset counts from the start of the prompt, as OpenAI's does, with or without echo
        tokens = (tokenize(prompt) if echo else []) + [(t, len(prompt) + off) for t, off in generated]
        text = (prompt if echo else "") + gen_text
        k = body.get("logprobs")
        logprobs = None
        if k is not None and not drop_logprobs:
            tops: list[dict[str, float] | None] = []
            lps: list[float | None] = []
            for i, (tok, off) in enumerate(tokens):
                if echo and i == 0:
                    tops.append(None)  # nothing predicts the first prompt token
                    lps.append(None)
                    continue
                top = self.responder.top_logprobs(full[:off], tok, max(int(k), 1))
                tops.append(dict(list(top.items())[: int(k)]))
                lps.append(top.get(tok, -10.0))
            logprobs = {"tokens": [t for t, _ in tokens], "token_logprobs": lps, "top_logprobs": tops,
                        "text_offset": [off for _, off in tokens]}
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": "length"}
        payload = {"id": "cmpl-test", "object": "text_completion", "created": int(time.time()),
                   "model": body.get("model", "test-model"), "choices": [choice]}
        return payload, len(generated), max_tokens - len(generated)


def _max_tokens(body: dict) -> int:
    for name in ("max_tokens", "max_completion_tokens"):
        if body.get(name) is not None:
            return int(body[name])
    return 16


def _prompt_text(body: dict) -> str:
    if "messages" in body:
        return "\n".join(str(m.get("content", "")) for m in body["messages"])
    prompt = body.get("prompt", "")
    return prompt[0] if isinstance(prompt, list) else str(prompt)


def _retry_after_headers(wait_s: float) -> dict[str, str]:
    return {"retry-after": str(max(1, math.ceil(wait_s))), "retry-after-ms": str(math.ceil(wait_s * 1000)),
            "x-ratelimit-reset-requests": f"{math.ceil(wait_s * 1000)}ms"}


def _rate_limited(wait_s: float, headers: dict[str, str]) -> JSONResponse:
    return JSONResponse({"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded",
                                   "code": "rate_limit_exceeded"}}, status_code=429, headers=headers)


class _DroppedResponse(Response):
    """Announces the full body, sends half of it, then drops the connection."""

    def __init__(self, raw: bytes):
        super().__init__(content=raw, media_type="application/json")
        self.raw = raw

    async def __call__(self, scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", str(len(self.raw)).encode())]})
        await send({"type": "http.response.body", "body": self.raw[: len(self.raw) // 2], "more_body": True})
        raise ConnectionAbortedError("injected dropped connection")
