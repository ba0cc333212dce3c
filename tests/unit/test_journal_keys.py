"""What the call journal may replay: keys that cover endpoint, model and every request parameter; answers the
method rejected are never replayed; URLs shown without credentials; Retry-After read on the server's clock."""
import asyncio
import email.utils

import pytest

from schemas.config import ConfigError, SweepConfig
from workers.llm.backends.base import ChatResponse, TransientLLMError, Usage
from workers.llm.backends.openai_compat import retry_after_from_headers
from workers.llm.journal import CallJournal, request_key
from workers.llm.redact import redact_url, scrub
from workers.llm.verdict import judged

CHAT = {"op": "chat", "messages": [{"role": "user", "content": "x"}], "max_tokens": 8, "temperature": 0.0,
        "top_logprobs": None, "seed": None}
A = "http://127.0.0.1:8001/v1"


def key(request=CHAT, *, provider="openai", model="m", endpoint=A):
    return request_key(provider, model, request, endpoint=endpoint)


# --- keys --------------------------------------------------------------------------------------------------
def test_two_endpoints_of_one_provider_and_model_have_different_keys():
    assert key() != key(endpoint="http://127.0.0.1:8002/v1")
    assert key() != key(endpoint="https://api.openai.com/v1")


def test_key_changes_with_model_and_with_every_request_parameter():
    assert key() != key(model="m2") and key() != key(provider="local")
    changed = {"messages": [{"role": "user", "content": "y"}], "max_tokens": 9, "temperature": 0.7,
               "top_logprobs": 5, "seed": 2, "op": "other"}
    for name, value in changed.items():
        assert key({**CHAT, name: value}) != key(), name


def test_key_ignores_credentials_in_the_url_and_dict_order():
    assert key(endpoint="http://user:s3cret@127.0.0.1:8001/v1/") == key(endpoint="http://other:pw@127.0.0.1:8001/v1")
    assert key(endpoint="HTTP://127.0.0.1:8001/v1/") == key()
    assert key(dict(reversed(list(CHAT.items())))) == key()


# --- URLs for display ---------------------------------------------------------------------------------------
def test_redact_url_hides_user_info_and_credential_query_values():
    assert redact_url("https://user:s3cret@Host.example:8443/v1/") == "https://***@host.example:8443/v1"
    assert redact_url("https://tok123@host/v1") == "https://***@host/v1"
    assert redact_url("https://h/v1?api-version=2024-06&api_key=abc&sig=xyz") == \
        "https://h/v1?api-version=2024-06&api_key=***&sig=***"
    assert redact_url("http://127.0.0.1:8000/v1") == "http://127.0.0.1:8000/v1"
    assert redact_url("http://host:notaport/v1") == "<unparseable URL>"


def test_scrub_removes_the_url_and_its_secrets_from_text():
    url = "https://alice:p%40ss@host/v1?token=t0k"
    text = f"POST {url}/chat failed; user alice, password p@ss, token t0k"
    out = scrub(text, url)
    assert "p%40ss" not in out and "p@ss" not in out and "t0k" not in out and "alice" not in out
    assert "https://***@host/v1?token=***/chat" in out


# --- statuses: pending, ok, rejected ----------------------------------------------------------------------
def answer(text):
    return ChatResponse(text, Usage(5, 2))


async def parse(response, good: bool):
    async with judged(response):
        if not good:
            raise TransientLLMError("misaligned answer")


def test_a_stored_answer_is_pending_until_the_method_accepts_it(tmp_path):
    j = CallJournal(tmp_path / "j.sqlite")
    fresh = answer("fine")
    j.put("k", fresh, provider="openai", model="m", latency_s=0.1)
    assert j.status("k") == "pending"
    assert j.get("k").text == "fine"  # pending answers replay: the replay is judged again
    asyncio.run(parse(fresh, good=True))
    assert j.status("k") == "ok" and j.get("k").cached


def test_a_rejected_answer_is_never_replayed_and_the_next_answer_replaces_it(tmp_path):
    j = CallJournal(tmp_path / "j.sqlite")
    bad = answer("garbage")
    j.put("k", bad, provider="openai", model="m", latency_s=0.1)
    with pytest.raises(TransientLLMError):
        asyncio.run(parse(bad, good=False))
    assert j.status("k") == "rejected" and j.get("k") is None and "k" not in j
    assert [r["status"] for r in j.rows_for(["k"])] == ["rejected"]  # still exported: it was paid for
    good = answer("fine")
    j.put("k", good, provider="openai", model="m", latency_s=0.1)
    assert j.status("k") == "pending" and j.get("k").text == "fine"
    # a late verdict on the replaced answer must not touch the new one
    with pytest.raises(TransientLLMError):
        asyncio.run(parse(bad, good=False))
    assert j.status("k") == "pending"


def test_a_replayed_answer_the_method_now_rejects_stops_being_replayed(tmp_path):
    j = CallJournal(tmp_path / "j.sqlite")
    first = answer("old")
    j.put("k", first, provider="openai", model="m", latency_s=0.1)
    asyncio.run(parse(first, good=True))
    replay = CallJournal(tmp_path / "j.sqlite").get("k")
    with pytest.raises(TransientLLMError):
        asyncio.run(parse(replay, good=False))
    assert j.get("k") is None


def test_accepted_and_pending_answers_keep_first_answer_wins(tmp_path):
    j = CallJournal(tmp_path / "j.sqlite")
    j.put("k", answer("first"), provider="openai", model="m", latency_s=0.1)
    j.put("k", answer("second"), provider="openai", model="m", latency_s=0.1)
    assert j.get("k").text == "first"


def test_judging_a_response_that_no_journal_stored_changes_nothing():
    asyncio.run(parse(answer("x"), good=True))
    with pytest.raises(TransientLLMError):
        asyncio.run(parse(answer("x"), good=False))


# --- Retry-After on the server's clock --------------------------------------------------------------------
def http_date(t):
    return email.utils.formatdate(t, usegmt=True)


def test_an_http_date_retry_after_is_read_against_the_servers_date_not_the_local_clock():
    server_now = 1_700_000_000.0
    headers = {"Retry-After": http_date(server_now + 30), "Date": http_date(server_now)}
    assert retry_after_from_headers(headers, now=server_now + 3600) == pytest.approx(30)  # local clock ahead
    assert retry_after_from_headers(headers, now=server_now - 3600) == pytest.approx(30)  # local clock behind
    no_date = {"Retry-After": http_date(server_now + 30)}
    assert retry_after_from_headers(no_date, now=server_now + 10) == pytest.approx(20)
    assert retry_after_from_headers({"Retry-After": "not a date"}) is None


def test_retry_after_cap_is_validated_with_one_line():
    assert SweepConfig().simulator.retry_after_cap_s == 120
    with pytest.raises(ConfigError, match=r"^explainer\.retry_after_cap_s: Input should be greater than 0 \(got 0\)$"):
        SweepConfig.from_dict({"explainer": {"retry_after_cap_s": 0}})


def test_a_replayed_prompt_logprobs_answer_carries_every_field_it_was_stored_with(tmp_path):
    from workers.llm.backends.base import PromptLogprobsResponse

    stored = PromptLogprobsResponse([{" 1": -0.2, " 0": -1.9}], Usage(30, 0), branches=[{"0": -0.1}])
    j = CallJournal(tmp_path / "j.sqlite")
    j.put("k", stored, provider="local", model="m", latency_s=0.0)
    replay = CallJournal(tmp_path / "j.sqlite").get("k")
    assert (replay.positions, replay.branches, replay.usage, replay.cached) == (
        [{" 1": -0.2, " 0": -1.9}], [{"0": -0.1}], Usage(30, 0), True)


def test_importing_rows_replaces_a_rejected_answer_but_never_with_a_rejected_one(tmp_path):
    here = CallJournal(tmp_path / "here.sqlite")
    bad = answer("garbage")
    here.put("k", bad, provider="openai", model="m", latency_s=0.1)
    with pytest.raises(TransientLLMError):
        asyncio.run(parse(bad, good=False))
    other = CallJournal(tmp_path / "other.sqlite")  # another node got a good answer for the same request
    good = answer("fine")
    other.put("k", good, provider="openai", model="m", latency_s=0.1)
    asyncio.run(parse(good, good=True))
    rejected_elsewhere = [{**row, "key": "k2", "status": "rejected"} for row in other.export()]
    assert here.import_rows(other.export() + rejected_elsewhere) == 2
    assert here.get("k").text == "fine" and here.status("k") == "ok" and here.get("k2") is None
    assert here.import_rows([{**row, "status": "rejected"} for row in other.export()]) == 0
    assert here.status("k") == "ok"


def test_a_tokenization_answer_is_journaled_and_replayed(tmp_path):
    # an endpoint learns its tokenizer through a paid echo call: a second process must not pay it again
    import asyncio

    from workers.llm.backends.base import Capabilities
    from workers.llm.client import LLMClient
    from workers.llm.journal import CallJournal

    class Echo:
        provider, model, endpoint = "openai", "m", "http://127.0.0.1:1/v1"
        capabilities = Capabilities()
        calls = 0

        async def tokenize(self, text):
            Echo.calls += 1
            return ["a", "\t", "1", "0", "\n"]

        async def aclose(self):
            pass

    async def ask():
        client = LLMClient(Echo(), role="simulator", journal=CallJournal(tmp_path / "calls.sqlite"))
        return await client.tokenize("a\t10\n")

    assert asyncio.run(ask()) == ["a", "\t", "1", "0", "\n"]
    assert asyncio.run(ask()) == ["a", "\t", "1", "0", "\n"]
    assert Echo.calls == 1
