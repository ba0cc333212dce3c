"""LLMClient: retries per fault class, no retry on permanent errors, failures recorded not raised past the item,
journal hits not paid, in-flight duplicates shared, limiter paused on 429, and a kill -9 restart that repeats no
journaled call (counted at the test server)."""
import asyncio
import collections
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from schemas.config import Backend
from testing.testserver import Responder, TestServer
from workers.llm.backends.base import (
    Capabilities,
    ChatResponse,
    LLMBackend,
    LLMError,
    PermanentLLMError,
    Usage,
)
from workers.llm.client import CallEvent, LLMClient, make_client
from workers.llm.journal import CallJournal
from workers.llm.ratelimit import AsyncLimiter, LimiterClient, RateLimiter


class CountingResponder(Responder):
    def __init__(self):
        self.asked = collections.Counter()

    def chat(self, messages, max_tokens):
        content = messages[-1]["content"]
        self.asked[content] += 1
        return f" answer to {content}"


def backend_cfg(server, **kw):
    return Backend(kind="openai", model="test-model", base_url=server.base_url, api_key_env=None, timeout_s=1.0,
                   **kw)


def client_for(server, tmp_path=None, events=None, **kw):
    kw = {"max_retries": 3, **kw}
    journal = CallJournal(tmp_path / "journal.sqlite") if tmp_path else None
    client = make_client(backend_cfg(server, **kw), env={}, role="explainer", journal=journal,
                         on_call=events.append if events is not None else None, use_ray=False)
    client._backoff = lambda state: 0.01  # keep the test fast; the policy itself is tenacity's
    return client


def ask(client, content, **kw):  # room for the default answer (7 tokens): a cut one is malformed
    return asyncio.run(client.chat([{"role": "user", "content": content}], max_tokens=8, top_logprobs=2, **kw))


@pytest.fixture
def server():
    with TestServer(hang_s=3) as s:
        yield s


@pytest.mark.parametrize("fault, status", [("500", "5xx"), ("503", "5xx"), ("429", "429"), ("hang", "timeout"),
                                           ("drop", "connection"), ("malformed", "malformed"),
                                           ("truncated", "malformed"), ("missing_logprobs", "transient")])
def test_each_fault_is_retried_and_the_call_then_succeeds(server, fault, status):
    events: list[CallEvent] = []
    client = client_for(server, events=events)
    server.inject(fault, times=2)
    response = ask(client, f"item {fault[:5]:>5}")  # 10 characters whatever the fault
    assert response.text == " Answer about 10 characters: words and numbers." and len(response.logprobs) == 7
    assert [e.status for e in events] == [status, status, "ok"]
    assert [e.final for e in events] == [False, False, True] and events[-1].completion_tokens == 7


def test_permanent_errors_are_not_retried():
    from fastapi.responses import JSONResponse

    with TestServer() as s:
        seen = []

        @s.app.middleware("http")
        async def forbid(request, call_next):
            seen.append(request.url.path)
            return JSONResponse({"error": {"message": "bad key"}}, status_code=403)

        events = []
        with pytest.raises(PermanentLLMError):
            ask(client_for(s, events=events), "x")
        assert [(e.status, e.final) for e in events] == [("error", True)]
        assert seen == ["/v1/chat/completions"]


def test_items_whose_retries_run_out_are_recorded_and_none_is_lost():
    with TestServer(fault_rates={"500": 0.5, "drop": 0.1, "malformed": 0.1}, seed=3) as s:
        client = client_for(s, max_retries=1)
        outcome = {}

        async def item(i):
            try:
                outcome[i] = (await client.chat([{"role": "user", "content": f"n{i}"}], max_tokens=8)).text
            except LLMError as e:
                outcome[i] = f"failed: {e}"

        async def run():
            await asyncio.gather(*[item(i) for i in range(30)])

        asyncio.run(run())
    assert sorted(outcome) == list(range(30))
    failed = [v for v in outcome.values() if v.startswith("failed")]
    assert 0 < len(failed) < 30  # with 70% faults and 2 attempts, some fail, some succeed


def test_journal_answers_repeats_without_paying(server, tmp_path):
    responder = server.responder = CountingResponder()
    events = []
    first = ask(client_for(server, tmp_path, events), "same question")
    again = ask(client_for(server, tmp_path, events), "same question")  # a new client, as after a restart
    assert not first.cached and again.cached and again.text == first.text and again.logprobs == first.logprobs
    assert responder.asked["same question"] == 1
    assert [e.status for e in events] == ["ok", "cached"] and events[0].key == events[1].key


def test_identical_requests_in_flight_share_one_call(server):
    responder = server.responder = CountingResponder()
    client = client_for(server)

    async def run():
        return await asyncio.gather(*[client.chat([{"role": "user", "content": "dup"}], max_tokens=3)
                                      for _ in range(5)])

    assert len({r.text for r in asyncio.run(run())}) == 1
    assert responder.asked["dup"] == 1


def test_429_pauses_the_shared_limiter_and_retry_after_is_honoured(server):
    shared = AsyncLimiter(RateLimiter(6000, 10**7))
    client = client_for(server)
    client.limiter = LimiterClient(shared, requests_per_minute=6000)
    server.inject("429")
    start = time.monotonic()
    ask(client, "throttled")
    assert time.monotonic() - start >= 1.0  # the server's Retry-After was 1 s
    assert shared.limiter.stats.pauses == 1


class Slow:
    provider, model, capabilities = "fake", "slow", Capabilities()

    def __init__(self):
        self.calls = 0

    async def chat(self, messages, *, max_tokens, temperature=0.0, top_logprobs=None, seed=None):
        self.calls += 1
        if self.calls == 1:
            await asyncio.sleep(5)
        if self.calls == 2:
            raise KeyError("backend bug")
        return ChatResponse("ok", Usage(1, 1))

    async def prompt_logprobs(self, prompt, offsets, *, top_k):
        raise NotImplementedError

    async def aclose(self):
        pass


def test_per_request_timeout_and_backend_bugs_become_llm_errors():
    slow = Slow()
    events = []
    client = LLMClient(slow, timeout_s=0.2, max_retries=2, on_call=events.append, backoff_initial_s=0.01)
    assert isinstance(client, LLMBackend)
    with pytest.raises(PermanentLLMError, match="KeyError"):
        asyncio.run(client.chat([{"role": "user", "content": "x"}], max_tokens=1))
    assert [e.status for e in events] == ["timeout", "error"]


CHILD = """
import asyncio, sys
from schemas.config import Backend
from workers.llm.journal import CallJournal
from workers.llm.client import make_client

async def main(url, path, n):
    cfg = Backend(kind="openai", model="test-model", base_url=url, api_key_env=None, concurrency=4)
    client = make_client(cfg, env={}, role="simulator", journal=CallJournal(path), use_ray=False)
    sem = asyncio.Semaphore(4)
    async def one(i):
        async with sem:
            await client.chat([{"role": "user", "content": f"item {i}"}], max_tokens=5)
    await asyncio.gather(*[one(i) for i in range(n)])
    print("all done", flush=True)

asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
"""


def test_kill_9_mid_run_then_restart_repeats_no_journaled_call(tmp_path):
    responder = CountingResponder()
    path = tmp_path / "journal.sqlite"
    n = 60
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    with TestServer(responder=responder, latency=lambda: 0.03) as s:
        args = [sys.executable, "-c", CHILD, s.base_url, str(path), str(n)]
        proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while sum(responder.asked.values()) < 20:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        journaled = {json.loads(r["response"])["text"].removeprefix(" answer to ")
                     for r in CallJournal(path).export()}
        asked_at_kill = sum(responder.asked.values())
        assert 15 <= len(journaled) < n
        done = subprocess.run(args, env=env, capture_output=True, timeout=120)
        assert done.returncode == 0 and b"all done" in done.stdout
    assert all(responder.asked[item] == 1 for item in journaled)  # nothing the journal held was paid again
    assert set(responder.asked) == {f"item {i}" for i in range(n)}
    # only calls in flight at the kill (answered but not yet journaled) may have been paid twice
    assert sum(responder.asked.values()) - n <= asked_at_kill - len(journaled) <= 4
    assert len(CallJournal(path)) == n
