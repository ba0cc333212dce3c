"""Batched generation in the local backend equals unbatched greedy generation token for token (float32):
rows of different prompt lengths and `max_tokens` decode together, finish at different steps and leave, and
requests that arrive later join the running batch. The reference is Hugging Face `generate` on one prompt."""
import asyncio

import pytest
import torch

from testing.models import tiny_model
from workers.llm.backends.local import CHATML, LocalBackend


def greedy_reference(model, tokenizer, messages: list[dict], max_tokens: int) -> list[int]:
    template = None if getattr(tokenizer, "chat_template", None) else CHATML
    ids = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                        tokenize=True, return_dict=False)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    x = torch.tensor([ids])
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_tokens, do_sample=False,
                             pad_token_id=tokenizer.eos_token_id)
    return out[0, len(ids):].tolist()


def as_tokens(tokenizer, ids: list[int]) -> list[str]:
    return [tokenizer.decode([i]) for i in ids]


def batched(backend: LocalBackend, requests: list[tuple[list[dict], int]], late: list[tuple[list[dict], int]]):
    """All of `requests` at once, then `late` ones after the first rows have stepped a few times."""
    async def run():
        first = [asyncio.ensure_future(backend.chat(m, max_tokens=n, top_logprobs=1)) for m, n in requests]
        while backend.stats.steps < 3 and not all(f.done() for f in first):
            await asyncio.sleep(0.001)
        second = [asyncio.ensure_future(backend.chat(m, max_tokens=n, top_logprobs=1)) for m, n in late]
        return await asyncio.gather(*first, *second)
    return asyncio.run(run())


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_batched_greedy_generation_equals_unbatched_token_for_token(kind):
    tiny = tiny_model(kind)
    system = {"role": "system", "content": "You explain what one neuron of a language model responds to."}
    ask = [([system, {"role": "user", "content": f"text {i}: " + "the cat sat on the mat. " * (1 + i)}], 6 + 3 * i)
           for i in range(8)]
    requests, late = ask[:5], ask[5:]
    backend = LocalBackend(tiny.model, tiny.tokenizer, name=f"tiny-{kind}", min_prefix_tokens=4)
    answers = batched(backend, requests, late)
    assert backend.stats.step_rows > backend.stats.steps > 0  # rows really stepped together
    assert backend.stats.prefix_tokens_reused > 0  # and shared the system prompt's keys/values
    for (messages, max_tokens), got in zip(requests + late, answers):
        want = greedy_reference(tiny.model, tiny.tokenizer, messages, max_tokens)
        assert [t.token for t in got.logprobs] == as_tokens(tiny.tokenizer, want)
        assert got.usage.completion_tokens == len(want)


def test_a_sampled_request_draws_the_same_whatever_its_batch(tiny_llama):
    backend = LocalBackend(tiny_llama.model, tiny_llama.tokenizer, name="tiny-llama")
    ask = [{"role": "user", "content": "Describe the neuron."}]
    others = [[{"role": "user", "content": f"Something else {i}."}] for i in range(4)]

    async def alone():
        return await backend.chat(ask, max_tokens=8, temperature=1.0, seed=11)

    async def in_company():
        crowd = [backend.chat(m, max_tokens=8, temperature=1.0, seed=i) for i, m in enumerate(others)]
        return (await asyncio.gather(backend.chat(ask, max_tokens=8, temperature=1.0, seed=11), *crowd))[0]

    a, b = asyncio.run(alone()), asyncio.run(in_company())
    assert a.text == b.text and a.usage == b.usage


@pytest.mark.real_model
def test_batched_generation_of_explanations_equals_unbatched_on_the_embedded_model():
    """The real explainer prompts (instructions and worked examples shared, records differing) on SmolLM2 in
    float32: three explanations generated together equal three generated alone."""
    from workers.extract.corpus import pydoc_texts
    from workers.method.prompts import explainer_messages
    from workers.models.loading import load_model

    lm = load_model(dtype="float32")
    texts = pydoc_texts()[3:6]
    requests = []
    for i, text in enumerate(texts):
        ids = lm.tokenizer(text)["input_ids"][:24]
        tokens = [lm.tokenizer.decode([t]) for t in ids]
        records = [(tokens, [(k * (i + 3)) % 11 if k % 4 == i else 0 for k in range(len(tokens))])] * 2
        requests.append((explainer_messages(records), 16))
    backend = LocalBackend(lm.model, lm.tokenizer, name="smollm2-135m")
    answers = batched(backend, requests[:2], requests[2:])
    assert backend.stats.prefix_tokens_reused > 0
    for (messages, max_tokens), got in zip(requests, answers):
        want = greedy_reference(lm.model, lm.tokenizer, messages, max_tokens)
        assert [t.token for t in got.logprobs] == as_tokens(lm.tokenizer, want)
