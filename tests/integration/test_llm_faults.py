"""The LLM layer cannot lie: the journal answers only for the endpoint that was asked, never replays an answer
the method rejected; Retry-After is capped and read on the server's clock; one caller's cancellation never
reaches another sharing its call; a passing outage during the capability probe decides nothing; an answer cut
at max_tokens is not accepted; credentials inside base_url go nowhere. All against the test server."""
import asyncio
import base64
import email.utils
import logging
import time

import pytest

from schemas.config import Backend
from testing.stubs import RuleResponder
from testing.testserver import Responder, TestServer, fixed_latency
from workers.llm.backends.base import ChatResponse, RateLimitedError, TransientLLMError, UnsupportedError
from workers.llm.backends.openai_compat import OpenAICompatBackend
from workers.llm.client import make_client
from workers.llm.journal import CallJournal
from workers.llm.ratelimit import _IN_PROCESS, AsyncLimiter, LimiterClient, RateLimiter
from workers.method.records import ActivationRecord

MESSAGES = [{"role": "user", "content": "the question"}]


class Fixed(Responder):
    """Answers `text` to every chat and counts the chats."""

    def __init__(self, text: str):
        self.text = text
        self.asked = 0

    def chat(self, messages, max_tokens):
        self.asked += 1
        return self.text


def backend_cfg(server, base_url=None, **kw):
    return Backend(kind="openai", model="test-model", base_url=base_url or server.base_url, api_key_env=None,
                   timeout_s=5.0, **{"max_retries": 3, **kw})


def client_for(server, journal=None, events=None, **kw):
    client = make_client(backend_cfg(server, **kw), env={}, role="explainer", journal=journal,
                         on_call=events.append if events is not None else None, use_ray=False)
    client._backoff = lambda state: 0.01  # keep the test fast; the policy itself is tenacity's
    return client


def ask(client, max_tokens=32):
    return asyncio.run(client.chat(MESSAGES, max_tokens=max_tokens))


# --- 5: the journal key covers the endpoint ---------------------------------------------------------------
def test_after_base_url_changes_the_new_server_answers_not_the_old_servers_journal_row(tmp_path):
    journal = CallJournal(tmp_path / "journal.sqlite")
    with TestServer(responder=Fixed(" from A")) as a, TestServer(responder=Fixed(" from B")) as b:
        first = ask(client_for(a, journal))
        second = ask(client_for(b, journal))  # a resumed run pointed at another server of the same model
        again = ask(client_for(b, journal))
    assert (first.text, second.text, again.text) == (" from A", " from B", " from B")
    assert not second.cached and again.cached
    assert (a.responder.asked, b.responder.asked) == (1, 1)


# --- 7: Retry-After capped, and read on the server's clock ----------------------------------------------------
def test_a_day_long_retry_after_is_capped_for_the_caller_and_the_shared_limiter(caplog):
    with TestServer() as server:
        client = client_for(server, retry_after_cap_s=0.5)
        shared = AsyncLimiter(RateLimiter(6000, 10**7))
        pauses, pause = [], shared.pause

        async def record_pause(seconds):
            pauses.append(seconds)
            await pause(seconds)

        shared.pause = record_pause
        client.limiter = LimiterClient(shared, requests_per_minute=6000)
        server.inject("429", headers={"retry-after": "86400"})
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="workers.llm.backends.openai_compat"):
            response = ask(client)
        elapsed = time.monotonic() - start
    assert response.text and pauses == [0.5]  # every caller of the endpoint paused half a second, not a day
    assert 0.5 <= elapsed < 60  # this caller waited the capped time too
    assert "asked to wait 86400 s before retrying; waiting 0.5 s instead" in caplog.text
    assert "retry_after_cap_s" in caplog.text


@pytest.mark.parametrize("skew_s", [-3600.0, 3600.0])
def test_an_http_date_retry_after_counts_on_the_servers_clock_whatever_the_skew(skew_s):
    with TestServer(clock_skew_s=skew_s) as server:
        backend = OpenAICompatBackend(backend_cfg(server), env={})
        server.inject("429", headers={"retry-after": email.utils.formatdate(server.now() + 30, usegmt=True)})
        with pytest.raises(RateLimitedError) as e:
            asyncio.run(backend.chat(MESSAGES, max_tokens=32))
    assert 20 <= e.value.retry_after_s <= 30  # whole seconds in both dates, and the request's travel time


# --- 8: cancelling one caller of a shared call ------------------------------------------------------------------
def test_the_caller_that_started_a_shared_call_can_be_cancelled_without_cancelling_the_others():
    with TestServer(latency=fixed_latency(1.5)) as server:
        client = client_for(server)

        async def run():
            owner = asyncio.ensure_future(asyncio.wait_for(client.chat(MESSAGES, max_tokens=32), 0.5))
            await asyncio.sleep(0.05)  # the owner's call is on the wire
            sharer = asyncio.ensure_future(client.chat(MESSAGES, max_tokens=32))
            return await asyncio.gather(owner, sharer, return_exceptions=True)

        owner, shared = asyncio.run(run())
    assert isinstance(owner, TimeoutError)
    assert isinstance(shared, ChatResponse) and shared.text
    assert sum(server.calls.values()) == 1


def test_a_call_every_caller_left_is_cancelled_and_frees_its_slot():
    with TestServer(latency=fixed_latency(2.0)) as server:
        client = client_for(server, concurrency=1)

        async def run():
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(client.chat([{"role": "user", "content": "abandoned"}], max_tokens=32), 0.1)
            start = time.monotonic()
            await client.chat(MESSAGES, max_tokens=32)
            return time.monotonic() - start

        # the abandoned call would hold the only slot until its answer came (~1.9 s more): about 3.9 s
        assert asyncio.run(run()) < 3.2


# --- 9: the capability probe ------------------------------------------------------------------------------------
def test_transient_failures_during_the_probe_are_retried_then_fail_and_decide_nothing():
    with TestServer() as server:
        client = client_for(server, max_retries=1)
        server.inject("503", times=2, path="/v1/completions")
        with pytest.raises(TransientLLMError, match="capability probe of test-model at http://127.0.0.1"):
            asyncio.run(client.probe_capabilities())
        assert server.requests_to("/v1/completions") == 2  # one retry, then the probe failed
        assert not client.capabilities.prompt_logprobs  # nothing decided: still the unprobed default
        server.inject("503", times=1, path="/v1/completions")
        caps = asyncio.run(client.probe_capabilities())  # the retry absorbs the one 503 now
    assert caps.prompt_logprobs and caps.chat_logprobs and client.capabilities == caps


def test_a_refusal_during_the_probe_is_a_definite_no():
    from fastapi.responses import JSONResponse

    with TestServer() as server:
        @server.app.middleware("http")
        async def no_echo(request, call_next):
            if request.url.path == "/v1/completions":
                return JSONResponse({"error": {"message": "echo is not supported"}}, status_code=404)
            return await call_next(request)

        caps = asyncio.run(client_for(server).probe_capabilities())
    assert caps.chat_logprobs and not caps.prompt_logprobs


# --- 10: answers cut at max_tokens ------------------------------------------------------------------------------
def test_an_answer_cut_at_max_tokens_is_malformed_retried_then_failed_and_not_journaled(tmp_path):
    journal = CallJournal(tmp_path / "journal.sqlite")
    events = []
    with TestServer(responder=Fixed(" one two three four five six")) as server:
        client = client_for(server, journal, events, max_retries=2)
        with pytest.raises(TransientLLMError, match="max_tokens=4") as e:
            ask(client, max_tokens=4)
        assert [ev.status for ev in events] == ["malformed"] * 3 and getattr(e.value, "kind", None) == "malformed"
        assert len(journal) == 0
        whole = ask(client, max_tokens=6)  # exactly fits: finish_reason "stop"
    assert whole.text == " one two three four five six" and not whole.cached


# --- 13: credentials inside base_url --------------------------------------------------------------------------
def test_credentials_in_base_url_reach_no_journal_log_limiter_name_or_error(tmp_path, caplog):
    from fastapi.responses import JSONResponse

    journal_path = tmp_path / "journal.sqlite"
    events, authorization = [], set()
    with TestServer() as server:
        @server.app.middleware("http")
        async def no_echo(request, call_next):
            authorization.add(request.headers.get("authorization"))
            if request.url.path == "/v1/completions":
                return JSONResponse({"error": {"message": "not here"}}, status_code=404)
            return await call_next(request)

        url = server.base_url.replace("http://", "http://alice:s3cret-pw@")
        client = client_for(server, CallJournal(journal_path), events, base_url=url, retry_after_cap_s=0.2)
        server.inject("429", headers={"retry-after": "3600"})  # capped: logged with the endpoint
        server.inject("500")
        with caplog.at_level(logging.DEBUG):
            assert ask(client).text
            with pytest.raises(UnsupportedError) as refused:
                asyncio.run(client.prompt_logprobs("a b", [1], top_k=2))
    shown = [repr(client.backend), client.backend.endpoint, str(refused.value), caplog.text, *_IN_PROCESS,
             *(f"{e.provider} {e.model} {e.error}" for e in events)]
    assert "***@127.0.0.1" in str(refused.value) and "asked to wait 3600 s" in caplog.text
    assert authorization == {"Basic " + base64.b64encode(b"alice:s3cret-pw").decode()}  # still sent, as Basic auth
    for text in shown:
        assert "s3cret" not in text and "alice" not in text, text
    for path in tmp_path.iterdir():  # the journal and its write-ahead log
        assert b"s3cret" not in path.read_bytes() and b"alice" not in path.read_bytes()


# --- 6: answers the method rejected are not replayed -------------------------------------------------------------
RECORDS = [ActivationRecord(i, ["a", " 1", " b"], [0.0, 3.0, 0.0]) for i in range(3)]


def test_explanations_the_method_rejected_are_asked_again_once_the_endpoint_is_fixed(tmp_path):
    from workers.method.explainer import NeuronExplainer

    journal = CallJournal(tmp_path / "journal.sqlite")
    responder = Fixed(" ...")  # no explanation in it: rejected, retried with other samples, then failed
    with TestServer(responder=responder) as server:
        [broken] = asyncio.run(NeuronExplainer(client_for(server, journal)).explain(RECORDS))
        assert broken.text is None and responder.asked == 3
        responder.text = " digits and numbers."
        [fixed] = asyncio.run(NeuronExplainer(client_for(server, journal)).explain(RECORDS))
    assert fixed.text == "digits and numbers" and responder.asked == 4  # one new call, not three replays
    assert sorted(r["status"] for r in journal.export()) == ["ok", "rejected", "rejected"]


class SimulatorAnswers(Responder):
    """Misaligned simulator answers until `fixed`, then the rule stub's aligned ones."""

    def __init__(self):
        self.rule, self.fixed, self.asked = RuleResponder(), False, 0

    def chat(self, messages, max_tokens):
        self.asked += 1
        return self.rule.chat(messages, max_tokens) if self.fixed else "token\t3\nanother\t5"


def test_simulations_the_method_rejected_are_asked_again_once_the_endpoint_is_fixed(tmp_path):
    from schemas.config import Simulator
    from workers.method.prompts import MalformedAnswerError
    from workers.method.simulator import NeuronSimulator

    journal = CallJournal(tmp_path / "journal.sqlite")
    responder = SimulatorAnswers()
    explanation, tokens = "digits and numbers written with digits", [r.tokens for r in RECORDS[:1]]
    with TestServer(responder=responder) as server:
        def simulate():
            simulator = NeuronSimulator(client_for(server, journal, capabilities="chat"),
                                        Simulator(mode="logprob_free"))
            return asyncio.run(simulator.simulate(explanation, tokens))

        with pytest.raises(MalformedAnswerError):
            simulate()
        assert responder.asked == 3
        responder.fixed = True
        simulation = simulate()
    assert simulation.values == [[0.0, 10.0, 0.0]] and responder.asked == 4
