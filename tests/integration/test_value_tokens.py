"""The backends' side of reading "10" (docs/method.md §5): the local backend's prompt branches are the exact
next-token distribution after the placeholder's "1", and each backend tells how it tokenizes "10"."""
import asyncio

import pytest

from schemas.config import Backend
from schemas.config import Simulator as SimulatorConfig
from testing.models import tiny_model
from testing.testserver import TestServer
from workers.llm.backends.base import PermanentLLMError
from workers.llm.backends.local import LocalBackend
from workers.llm.backends.openai_compat import OpenAICompatBackend
from workers.llm.client import LLMClient
from workers.method.prompts import simulator_completion_prompt
from workers.method.simulator import NeuronSimulator
from workers.method.simulator.values import detect_digits_split

TOKENS = [["def", " f", "(", "x", "):"], [" return", " 10"]]


def _local(kind: str, **kw) -> LocalBackend:
    lm = tiny_model(kind, max_positions=2048)  # the simulator's prompt is longer than the default 256
    return LocalBackend(lm.model, lm.tokenizer, name=f"tiny-{kind}", **kw)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_local_branches_equal_a_plain_forward_of_the_prompt_cut_at_the_placeholder_plus_1(kind):
    fast = _local(kind, min_prefix_tokens=4)  # prefix KV reuse and batching on
    plain = _local(kind, min_prefix_tokens=10 ** 9, max_batch=1)
    prompts = [simulator_completion_prompt(e, TOKENS) for e in ("digits", "closing parentheses")]

    async def run():
        together = await asyncio.gather(*[fast.prompt_logprobs(p, o, top_k=1000, branch="1") for p, o in prompts])
        # the reference: the prompt cut at each placeholder, "1" appended, next-token distribution at the end
        refs = [[(await plain.prompt_logprobs(p[:o] + "1", [o + 1], top_k=1000)).positions[0] for o in offs]
                for p, offs in prompts]
        without = await fast.prompt_logprobs(*prompts[0], top_k=1000)
        return together, refs, without

    together, refs, without = asyncio.run(run())
    for resp, ref, (_, offsets) in zip(together, refs, prompts):
        assert len(resp.branches) == len(offsets) == len(resp.positions)
        for branch, expected in zip(resp.branches, ref):
            assert branch is not None  # top_k covers the whole tiny vocabulary, so "1" is always in it
            assert branch.keys() == expected.keys()
            assert all(branch[t] == pytest.approx(expected[t], abs=1e-4) for t in expected)
    # asking for branches leaves the positions as they were
    assert without.branches is None
    for a, b in zip(together[0].positions, without.positions):
        assert all(a[t] == pytest.approx(b[t], abs=1e-4) for t in b)


def test_local_branch_is_none_where_1_is_not_in_the_top_k_and_must_be_one_token():
    backend = _local("llama")
    prompt, offsets = simulator_completion_prompt("digits", TOKENS)
    resp = asyncio.run(backend.prompt_logprobs(prompt, offsets, top_k=2, branch="1"))
    assert [b is None for b in resp.branches] == ["1" not in top for top in resp.positions]
    with pytest.raises(PermanentLLMError, match="one token"):
        asyncio.run(backend.prompt_logprobs(prompt, offsets, top_k=2, branch="1 and more"))


def test_local_and_wrapped_backends_tell_how_they_tokenize_10():
    backend = _local("gpt2")  # the tiny tokenizer splits digits
    assert asyncio.run(backend.tokenize("a\t10\n")) == ["a", "\t", "1", "0", "\n"]
    client = LLMClient(backend, role="simulator")
    assert asyncio.run(detect_digits_split(client)) is True
    sim = NeuronSimulator(client, SimulatorConfig())
    asyncio.run(sim.simulate("digits", TOKENS))
    assert sim.mode == "prompt_logprob"
    assert (sim.settings()["digits_split"], sim.settings()["ten_from"]) == (True, "branch")


def test_an_echo_endpoint_tells_its_tokens():
    with TestServer() as server:
        cfg = Backend(kind="openai", model="m", base_url=server.base_url, api_key_env=None)
        backend = OpenAICompatBackend(cfg, env={})

        async def run():
            tokens = await backend.tokenize("a\t10\n")
            split = await detect_digits_split(backend)
            await backend.aclose()
            return tokens, split

        # the test server's words carry the whitespace before them: "10" stays whole
        assert asyncio.run(run()) == (["a", "\t10", "\n"], False)


@pytest.mark.real_model
def test_smollm2_branches_read_10_where_the_first_token_says_1():
    backend = LocalBackend.from_name("smollm2-135m")
    assert asyncio.run(backend.tokenize("a\t10\n")) == ["a", "\t", "1", "0", "\n"]
    prompt, offsets = simulator_completion_prompt("numbers written with digits", [[" in", " 19", "87", "."]])
    resp = asyncio.run(backend.prompt_logprobs(prompt, offsets, top_k=15, branch="1"))
    ref = asyncio.run(backend.prompt_logprobs(prompt[:offsets[1]] + "1", [offsets[1] + 1], top_k=15)).positions[0]
    assert resp.branches[1] is not None and "0" in resp.branches[1]
    assert resp.branches[1]["0"] == pytest.approx(ref["0"], abs=1e-3)
