"""Reading a predicted value where the simulator's tokenizer writes "10" as "1" + "0" (docs/method.md §5,
workers/method/simulator/values.py): one planted distribution over the value strings, written in the tokens of
a digit-splitting tokenizer or of one that keeps "10" whole, must give the same expected value."""
import asyncio
import math
from functools import lru_cache

import pytest

from schemas.config import Simulator as SimulatorConfig
from testing.models import tiny_tokenizer
from workers.llm.backends.base import Capabilities, PromptLogprobsResponse, RateLimitedError, UnsupportedError, Usage
from workers.method.scoring import expected_value
from workers.method.simulator import NeuronSimulator
from workers.method.simulator.values import detect_digits_split, digits_split

BRANCHES = Capabilities(chat=False, prompt_logprobs=True, prompt_branches=True)
# the planted distribution over value strings, and mass on a non-value token (the placeholder)
PLANTED = {0: 0.30, 1: 0.05, 3: 0.05, 9: 0.10, 10: 0.40}
OTHER = 0.10
EXPECTED = sum(v * p for v, p in PLANTED.items()) / sum(PLANTED.values())  # 4.95 / 0.9 = 5.5


@lru_cache(maxsize=1)
def whole_number_tokenizer():
    """A byte-level BPE with GPT-2's pre-tokenizer (digit runs stay together) that has learned "10": it writes
    "\\t10\\n" as "\\t", "10", "\\n", as GPT-2's tokenizer does."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=260, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(["a\t10\n b\t10\n 10 10 100"] * 10, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok)


def _pieces(tokenizer, text: str) -> list[str]:
    return [tokenizer.decode([i]) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


class PlantedValues:
    """An LLMBackend double whose model puts PLANTED (and OTHER on "unknown") on what follows every
    placeholder, in the tokens of `tokenizer`: the first token of each value string at the placeholder, and
    what follows a branch token in `branches`."""
    provider = model = "planted"

    def __init__(self, tokenizer, capabilities: Capabilities = BRANCHES):
        self.tokenizer, self.capabilities = tokenizer, capabilities
        self.branches_asked: list[str | None] = []

    async def tokenize(self, text: str) -> list[str]:
        return _pieces(self.tokenizer, text)

    async def prompt_logprobs(self, prompt, offsets, *, top_k, branch=None) -> PromptLogprobsResponse:
        self.branches_asked.append(branch)
        first: dict[str, float] = {"unknown": OTHER}
        after: dict[str, float] = {}
        for value, p in PLANTED.items():
            tab, head, *rest = _pieces(self.tokenizer, f"\t{value}\n")
            assert tab == "\t"
            first[head] = first.get(head, 0.0) + p
            if head == branch:
                after[rest[0]] = after.get(rest[0], 0.0) + p
        top = {t: math.log(p) for t, p in first.items()}
        cont = {t: math.log(p / first[branch]) for t, p in after.items()} if branch in first else None
        return PromptLogprobsResponse([top] * len(offsets), Usage(1, 0),
                                      branches=[cont] * len(offsets) if branch is not None else None)

    async def chat(self, *args, **kwargs):
        raise UnsupportedError("no chat")

    async def aclose(self):
        return None


def _simulate(backend, **cfg) -> tuple[list[float], dict]:
    sim = NeuronSimulator(backend, SimulatorConfig(**cfg))
    out = asyncio.run(sim.simulate("anything", [["a", " b"], ["c"]]))
    return [v for rec in out.values for v in rec], sim.settings()


def test_the_two_tokenizers_write_10_differently():
    assert _pieces(tiny_tokenizer(), "a\t10\n") == ["a", "\t", "1", "0", "\n"]
    assert _pieces(whole_number_tokenizer(), "a\t10\n") == ["a", "\t", "10", "\n"]
    assert digits_split(_pieces(tiny_tokenizer(), "a\t10\n"))
    assert not digits_split(_pieces(whole_number_tokenizer(), "a\t10\n"))


@pytest.mark.parametrize("tokenizer,split,ten_from", [(tiny_tokenizer, True, "branch"),
                                                      (whole_number_tokenizer, False, "token")])
def test_the_same_planted_distribution_gives_the_same_expected_value(tokenizer, split, ten_from):
    backend = PlantedValues(tokenizer())
    values, settings = _simulate(backend)
    assert values == [pytest.approx(EXPECTED)] * 3  # 5.5 with either tokenizer
    assert (settings["digits_split"], settings["ten_from"], settings["spaced_digits"]) == (split, ten_from, False)
    assert backend.branches_asked == (["1", "1"] if split else [None, None])


def test_reading_only_the_first_token_of_a_split_10_is_the_bug_this_fixes():
    resp = asyncio.run(PlantedValues(tiny_tokenizer()).prompt_logprobs("p", [0], top_k=15, branch="1"))
    top, after_one = resp.positions[0], resp.branches[0]
    # "1" carries P(1) + P(10) = .45; read as 1 that gives (.45 * 1 + .05 * 3 + .1 * 9) / .9 = 1.5 / .9
    assert expected_value(top) == pytest.approx(1.5 / 0.9)
    assert expected_value(top, after_one) == pytest.approx(EXPECTED)
    backend = PlantedValues(whole_number_tokenizer(), Capabilities(chat=False, prompt_logprobs=True))
    assert _simulate(backend)[0] == [pytest.approx(EXPECTED)] * 3  # whole "10": no branch needed
    with pytest.raises(UnsupportedError, match='writes "10" as "1"'):
        _simulate(PlantedValues(tiny_tokenizer(), Capabilities(chat=False, prompt_logprobs=True)))


def test_detection_without_a_tokenizer_is_unknown_and_errors_other_than_refusal_propagate():
    class NoTokenizer:
        pass

    class Refuses:
        async def tokenize(self, text):
            raise UnsupportedError("echo refused")

    class Broken:
        async def tokenize(self, text):
            raise RuntimeError("boom")

    assert asyncio.run(detect_digits_split(NoTokenizer())) is None
    assert asyncio.run(detect_digits_split(Refuses())) is None
    with pytest.raises(RuntimeError, match="boom"):
        asyncio.run(detect_digits_split(Broken()))


@pytest.mark.real_model
def test_the_default_simulators_tokenizer_splits_10_and_reads_the_planted_value():
    from workers.models.loading import load_tokenizer

    smollm2 = load_tokenizer("smollm2-135m")
    assert _pieces(smollm2, "a\t10\n") == ["a", "\t", "1", "0", "\n"]
    values, settings = _simulate(PlantedValues(smollm2))
    assert values == [pytest.approx(EXPECTED)] * 3
    assert (settings["digits_split"], settings["ten_from"]) == (True, "branch")


def test_a_failed_detection_fails_prompt_logprob_but_only_goes_unrecorded_for_the_chat_modes():
    class RateLimited:
        calls = 0

        async def tokenize(self, text):
            self.calls += 1
            raise RateLimitedError("429")

    backend = RateLimited()
    with pytest.raises(RateLimitedError):
        asyncio.run(detect_digits_split(backend))
    assert asyncio.run(detect_digits_split(backend, required=False)) is None
    assert asyncio.run(detect_digits_split(backend, required=False)) is None
    assert backend.calls == 3  # a failure is not remembered: the next simulator asks again
