"""Backends: the in-process local model (prefix KV reuse, batching, offsets) and the OpenAI-compatible client
against the test server (answers, logprob mapping, error classes, API key handling)."""
import asyncio

import pytest

from schemas.config import Backend, ConfigError
from testing.models import tiny_model
from testing.testserver import TestServer
from workers.llm.backends import make_backend
from workers.llm.backends.base import (
    LLMBackend,
    PermanentLLMError,
    RateLimitedError,
    TransientLLMError,
    UnsupportedError,
)
from workers.llm.backends.local import LocalBackend, common_prefix_len, token_positions
from workers.llm.backends.openai_compat import OpenAICompatBackend, parse_duration, retry_after_from_headers

PREFIX = "You look at a neuron. Here are examples of its activations.\n"


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


def local(tiny, **kw):
    return LocalBackend(tiny.model, tiny.tokenizer, name="tiny-llama", **kw)


# --- local ---------------------------------------------------------------------------------------------------
def test_token_positions_maps_offsets_to_the_row_before_the_token():
    # "ab cd": tokens 'ab' (0,2), ' cd' with trimmed offsets (3,5) as byte-level tokenizers report them
    mapping = [(0, 2), (3, 5)]
    assert token_positions(mapping, 5, [2, 5], ["ab", " cd"]) == [0, 1]  # ' cd' starts at 2 (its space)
    with pytest.raises(PermanentLLMError, match="inside the token 'ab'"):
        token_positions(mapping, 5, [1], ["ab", " cd"])
    with pytest.raises(PermanentLLMError, match="first token"):
        token_positions(mapping, 5, [0], ["ab", " cd"])
    assert common_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2


def test_local_prompt_logprobs_with_shared_prefix_and_batching_equal_plain_forwards(tiny):
    prompts = [PREFIX + f"record {i}: the cat sat on\t" for i in range(6)]
    offsets = [[len(p) - 1, len(p)] for p in prompts]  # the tab, and after the whole prompt
    fast = local(tiny, min_prefix_tokens=4)
    plain = local(tiny, min_prefix_tokens=10**9, max_batch=1)

    async def run():
        batched = await asyncio.gather(*[fast.prompt_logprobs(p, o, top_k=4) for p, o in zip(prompts, offsets)])
        again = await fast.prompt_logprobs(prompts[0], offsets[0], top_k=4)  # served from the cached prefix
        one_by_one = [await plain.prompt_logprobs(p, o, top_k=4) for p, o in zip(prompts, offsets)]
        return batched, again, one_by_one

    batched, again, one_by_one = asyncio.run(run())
    assert max(fast.stats.batch_sizes) > 1  # concurrent requests shared a forward
    assert fast.stats.prefix_tokens_reused > 0 and fast.stats.prefix_hits >= 1
    assert plain.stats.prefix_tokens_reused == 0
    for got, want in zip(batched + [again], one_by_one + [one_by_one[0]]):
        assert len(got.positions) == 2
        for a, b in zip(got.positions, want.positions):
            assert a.keys() == b.keys()
            assert all(abs(a[k] - b[k]) < 1e-4 for k in a)
            assert all(v <= 0 for v in a.values()) and len(a) <= 4
        assert got.usage.prompt_tokens == want.usage.prompt_tokens > 10


def test_local_offset_inside_a_token_is_a_clear_error(tiny):
    backend = local(tiny)
    enc = tiny.tokenizer("Hello world", return_offsets_mapping=True)
    inside = next(s + 1 for s, e in enc["offset_mapping"] if e - s > 1)
    with pytest.raises(PermanentLLMError, match="inside the token"):
        asyncio.run(backend.prompt_logprobs("Hello world", [inside], top_k=2))


def test_local_chat_reports_tokens_and_logprobs_and_is_deterministic(tiny):
    backend = local(tiny)
    msgs = [{"role": "user", "content": "Describe the neuron."}]

    async def run():
        a = await backend.chat(msgs, max_tokens=5, top_logprobs=3)
        b = await backend.chat(msgs, max_tokens=5, temperature=1.0, seed=7)
        c = await backend.chat(msgs, max_tokens=5, temperature=1.0, seed=7)
        return a, b, c

    a, b, c = asyncio.run(run())
    assert isinstance(backend, LLMBackend)
    assert a.usage.completion_tokens == len(a.logprobs) <= 5 and a.usage.prompt_tokens > 5
    assert all(t.logprob <= 0 and len(t.top) <= 3 and max(t.top.values()) >= t.logprob for t in a.logprobs)
    assert b.text == c.text  # same seed, same sample


# --- openai-compatible ------------------------------------------------------------------------------------------
def cfg(server, **kw):
    return Backend(kind="openai", model="test-model", base_url=server.base_url, api_key_env="NS_TEST_KEY",
                   timeout_s=2, **kw)


SECRET = "sk-very-secret-value-123"


@pytest.fixture(scope="module")
def server():
    with TestServer(hang_s=4) as s:
        yield s


def test_missing_key_fails_at_construction_naming_the_variable_not_a_value(server):
    with pytest.raises(ConfigError, match="NS_TEST_KEY") as e:
        make_backend(cfg(server), env={"OTHER": SECRET})
    assert SECRET not in str(e.value)
    backend = make_backend(cfg(server), env={"NS_TEST_KEY": SECRET})
    assert isinstance(backend, OpenAICompatBackend) and SECRET not in repr(backend)


def test_openai_chat_and_prompt_logprobs_map_the_server_answer(server):
    backend = OpenAICompatBackend(cfg(server), env={"NS_TEST_KEY": SECRET})
    prompt = "alpha beta\tgamma"

    async def run():
        chat = await backend.chat([{"role": "user", "content": "hi"}], max_tokens=7, top_logprobs=2)
        lp = await backend.prompt_logprobs(prompt, [5, 10, len(prompt)], top_k=3)
        await backend.aclose()
        return chat, lp

    chat, lp = asyncio.run(run())
    assert chat.usage.completion_tokens == 7 and len(chat.logprobs) == 7  # the whole default answer
    assert chat.text == "".join(t.token for t in chat.logprobs)
    assert all(len(t.top) == 2 for t in chat.logprobs)
    # tokens: 'alpha' (0), ' beta' (5), '\tgamma' (10); the test responder puts the true token first
    assert list(lp.positions[0])[0] == " beta" and list(lp.positions[1])[0] == "\tgamma"
    assert len(lp.positions) == 3 and all(len(p) == 3 for p in lp.positions)
    with pytest.raises(PermanentLLMError, match="not the start of a token"):
        asyncio.run(OpenAICompatBackend(cfg(server), env={"NS_TEST_KEY": SECRET}).prompt_logprobs(prompt, [2],
                                                                                                  top_k=2))


@pytest.mark.parametrize("fault, error, kind", [
    ("500", TransientLLMError, None), ("503", TransientLLMError, None), ("429", RateLimitedError, None),
    ("drop", TransientLLMError, "connection"), ("malformed", TransientLLMError, "malformed"),
    ("truncated", TransientLLMError, "malformed"), ("missing_logprobs", TransientLLMError, None),
    ("hang", TransientLLMError, "timeout"),
])
def test_every_fault_maps_to_a_retryable_error_without_the_key(server, fault, error, kind):
    backend = OpenAICompatBackend(cfg(server), env={"NS_TEST_KEY": SECRET})
    server.inject(fault)
    with pytest.raises(error) as e:
        asyncio.run(backend.chat([{"role": "user", "content": f"fault {fault}"}], max_tokens=2, top_logprobs=2))
    assert e.value.retryable and getattr(e.value, "kind", None) == kind
    assert SECRET not in str(e.value)
    if fault == "429":
        assert e.value.retry_after_s == pytest.approx(1.0)


def test_client_errors_are_permanent_and_echo_refusal_is_unsupported():
    from fastapi.responses import JSONResponse

    with TestServer() as s:
        @s.app.middleware("http")
        async def refuse(request, call_next):
            code = 401 if "chat" in request.url.path else 400
            return JSONResponse({"error": {"message": "no"}}, status_code=code)

        backend = OpenAICompatBackend(cfg(s), env={"NS_TEST_KEY": SECRET})
        with pytest.raises(PermanentLLMError) as e:
            asyncio.run(backend.chat([{"role": "user", "content": "x"}], max_tokens=1))
        assert e.value.status == 401 and not e.value.retryable
        with pytest.raises(UnsupportedError):
            asyncio.run(backend.prompt_logprobs("a b", [1], top_k=1))


def test_capabilities_configured_or_probed_once(server):
    configured = OpenAICompatBackend(cfg(server, capabilities="chat_logprobs"), env={"NS_TEST_KEY": "k"})
    assert configured.capabilities.chat_logprobs and not configured.capabilities.prompt_logprobs
    before = sum(server.calls.values())
    probed = [OpenAICompatBackend(cfg(server), env={"NS_TEST_KEY": "k"}) for _ in range(2)]
    caps = [asyncio.run(b.probe_capabilities()) for b in probed]
    assert caps[0] == caps[1] and caps[0].chat_logprobs and caps[0].prompt_logprobs
    assert sum(server.calls.values()) - before == 2  # one chat + one echo call, for both backends


def test_retry_after_parsing():
    assert retry_after_from_headers({"Retry-After": "7"}) == 7
    assert retry_after_from_headers({"retry-after-ms": "250", "retry-after": "1"}) == 0.25
    assert retry_after_from_headers({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"},
                                    now=1445412485.0) == pytest.approx(5.0)
    assert retry_after_from_headers({"x-ratelimit-reset-requests": "1m2s", "x-ratelimit-reset-tokens": "20ms"}) == 62
    assert retry_after_from_headers({}) is None
    assert parse_duration("6m0s") == 360 and parse_duration("1.5s") == 1.5 and parse_duration("abc") is None
