"""The OpenAI-compatible test server: real 429s with Retry-After, token accounting, faults, counters, responder."""
import time

import httpx2 as httpx
import pytest

from testing.testserver import Limits, Responder, TestServer, request_key, tokenize


def post(server, path, body):
    return httpx.post(server.base_url + path, json=body, timeout=10)


class StoppedClock:
    """Stands in for the `time` module inside testing.testserver: its monotonic clock, which the rate buckets
    read, moves only when the test advances it, so no refill happens between two requests however slow this
    machine is, and every wait the server announces is exact."""

    def __init__(self):
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def __getattr__(self, name):  # time.time(), time.sleep(), ...: the real ones
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch):
    import testing.testserver

    stopped = StoppedClock()
    monkeypatch.setattr(testing.testserver, "time", stopped)
    return stopped


def test_requests_per_minute_enforced_with_retry_after(clock):
    with TestServer(limits=Limits(requests_per_minute=120, burst_s=1.0)) as s:  # 2/s, bucket of 2
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
        codes = [post(s, "/chat/completions", body).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        r = post(s, "/chat/completions", body)
        # the empty bucket gets its next request in 1 / (2/s) = 0.5 s; Retry-After rounds up to whole seconds
        assert r.status_code == 429
        assert (r.headers["retry-after"], r.headers["retry-after-ms"]) == ("1", "500")
        clock.advance(0.499)
        assert post(s, "/chat/completions", body).status_code == 429
        clock.advance(0.001)
        assert post(s, "/chat/completions", body).status_code == 200
        assert s.status_counts()[429] == 3


class FourTokens(Responder):
    def chat(self, messages, max_tokens):
        return " w x y z"


def test_tokens_are_reserved_then_refunded(clock):
    with TestServer(limits=Limits(tokens_per_minute=600, burst_s=1.0), responder=FourTokens()) as s:
        # 10 tokens/s, bucket of 10. "a b" = 2 prompt tokens + 3 message overhead; max_tokens 4 -> reserve 9,
        # the answer uses all 4 (refund 0)
        body = {"model": "m", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 4}
        assert post(s, "/chat/completions", body).status_code == 200
        r = post(s, "/chat/completions", body)  # 1 token left: the 8 missing come in 0.8 s
        assert r.status_code == 429 and r.headers["retry-after-ms"] == "800"
        clock.advance(1.0)  # the bucket is full again (10 tokens/s, at most 10)
        # max_tokens 40 > bucket: admitted only on a full bucket (charge 45, level 10 - 45 = -35), then the
        # 36 unused completion tokens come back: level 1, so the next 9 need 0.8 s again
        big = {**body, "max_tokens": 40}
        answer = post(s, "/chat/completions", big)
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] == 4
        r = post(s, "/chat/completions", body)
        assert r.status_code == 429 and r.headers["retry-after-ms"] == "800"  # without the refund: 4400


def test_echo_logprobs_have_offsets_and_a_null_first_position():
    with TestServer() as s:
        prompt = "one two\tthree"
        r = post(s, "/completions", {"model": "m", "prompt": prompt, "echo": True, "logprobs": 2,
                                      "max_tokens": 0}).json()
        lp = r["choices"][0]["logprobs"]
        assert lp["tokens"] == ["one", " two", "\tthree"] and lp["text_offset"] == [0, 3, 7]
        assert lp["top_logprobs"][0] is None and lp["token_logprobs"][0] is None
        assert list(lp["top_logprobs"][1]) == [" two", " the"]
        assert r["choices"][0]["text"] == prompt and r["usage"]["prompt_tokens"] == 3


def test_faults_on_demand_and_counters_per_request():
    with TestServer(hang_s=0.5) as s:
        body = {"model": "m", "messages": [{"role": "user", "content": "x"}], "max_tokens": 2, "logprobs": True,
                "top_logprobs": 1}
        s.inject("500")
        s.inject("missing_logprobs")
        s.inject("malformed")
        assert post(s, "/chat/completions", body).status_code == 500
        assert post(s, "/chat/completions", body).json()["choices"][0]["logprobs"] is None
        with pytest.raises(ValueError):
            post(s, "/chat/completions", body).json()
        s.inject("drop")
        with pytest.raises(httpx.HTTPError):
            post(s, "/chat/completions", body)
        ok = post(s, "/chat/completions", body).json()
        assert ok["choices"][0]["logprobs"]["content"][0]["top_logprobs"][0]["token"] == " Answer"
        key = request_key("/v1/chat/completions", body)
        assert s.calls[key] == 5 and s.served[key] == 1
        with pytest.raises(ValueError):
            s.inject("nonsense")


def test_responder_is_pluggable():
    class Digits(Responder):
        def chat(self, messages, max_tokens):
            return " 7 7 7"

        def top_logprobs(self, context, token, k):
            return {" 7": -0.01, " 0": -5.0}

    with TestServer(responder=Digits()) as s:
        r = post(s, "/chat/completions", {"model": "m", "messages": [{"role": "user", "content": "?"}],
                                          "max_tokens": 2, "logprobs": True, "top_logprobs": 2}).json()
        assert r["choices"][0]["message"]["content"] == " 7 7"
        assert r["choices"][0]["finish_reason"] == "length"
        assert r["choices"][0]["logprobs"]["content"][0]["logprob"] == -0.01
    assert tokenize(" a\tb") == [(" a", 0), ("\tb", 2)]
