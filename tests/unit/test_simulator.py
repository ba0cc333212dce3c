"""The simulator's three modes (docs/method.md §5): mode choice, exact predictions, misaligned and truncated answers."""
import asyncio
import math

import pytest

from schemas.config import ConfigError
from schemas.config import Simulator as SimulatorConfig
from testing.stubs import RuleStubBackend, ScriptedBackend
from workers.llm.backends.base import (
    Capabilities,
    ChatResponse,
    PromptLogprobsResponse,
    TokenAlternatives,
    UnsupportedError,
    Usage,
)
from workers.method.prompts import MalformedAnswerError, simulator_completion_prompt
from workers.method.simulator import SIMULATOR_MODES, NeuronSimulator, choose_mode
from workers.method.simulator.base import SimulatorMode

ALL = Capabilities(chat=True, chat_logprobs=True, prompt_logprobs=True)
CHAT_LOGPROBS = Capabilities(chat=True, chat_logprobs=True)
CHAT = Capabilities(chat=True)
LN = math.log


def _sim(backend, **cfg):
    return NeuronSimulator(backend, SimulatorConfig(**cfg))


def _run(sim, tokens, explanation="digits"):
    return asyncio.run(sim.simulate(explanation, tokens))


@pytest.mark.parametrize("caps,mode", [(ALL, "prompt_logprob"), (CHAT_LOGPROBS, "generated_logprob"),
                                       (CHAT, "logprob_free")])
def test_auto_mode_is_the_best_the_backend_supports(caps, mode):
    assert choose_mode(ScriptedBackend([], caps)) == mode


def test_forced_mode_is_used_or_refused():
    assert choose_mode(ScriptedBackend([], ALL), "logprob_free") == "logprob_free"
    with pytest.raises(UnsupportedError, match="prompt_logprob"):
        choose_mode(ScriptedBackend([], CHAT), "prompt_logprob")
    with pytest.raises(UnsupportedError, match="can neither chat nor give logprobs"):
        choose_mode(ScriptedBackend([], Capabilities(chat=False)))


def test_the_registry_lists_the_modes_best_first():
    assert list(SIMULATOR_MODES) == ["prompt_logprob", "generated_logprob", "logprob_free"]
    assert all(cls.name == name for name, cls in SIMULATOR_MODES.items())
    with pytest.raises(ConfigError, match=r"simulator.mode: 'psychic' is not a simulator mode \(allowed: auto, "
                                          r"prompt_logprob, generated_logprob, logprob_free\)"):
        choose_mode(ScriptedBackend([], ALL), "psychic")


class Halfway(SimulatorMode):
    """Predicts 5 everywhere without calling the backend; for chat backends only."""
    name = "halfway"
    uses_logprobs = False

    @staticmethod
    def supported(caps):
        return caps.chat

    async def predict(self, backend, cfg, explanation, token_lists, *, attempt, spent):
        spent.append(Usage(1, 0))
        return [[5.0] * len(tokens) for tokens in token_lists]


def test_a_registered_mode_is_chosen_by_name_or_by_preference(monkeypatch):
    monkeypatch.setitem(SIMULATOR_MODES, "halfway", Halfway)
    sim = _sim(ScriptedBackend([], CHAT), mode="halfway", records_per_call=2)
    out = _run(sim, [["a", "b"], ["c"], ["d"]])
    assert out.values == [[5.0, 5.0], [5.0], [5.0]] and (out.calls, out.usage) == (2, Usage(2, 0))
    assert sim.settings()["mode"] == "halfway" and sim.settings()["top_logprobs"] is None
    with pytest.raises(UnsupportedError, match="simulator.mode=halfway needs a capability"):
        choose_mode(ScriptedBackend([], Capabilities(chat=False)), "halfway")
    monkeypatch.setattr("workers.method.simulator.SIMULATOR_MODES", {"halfway": Halfway, **SIMULATOR_MODES})
    assert choose_mode(ScriptedBackend([], ALL)) == "halfway"  # first in the registry that the backend supports


# --- mode 1: prompt logprobs -------------------------------------------------------------------------------
def test_prompt_logprob_mode_takes_expected_values_at_each_placeholder():
    positions = [{"0": LN(0.5), "10": LN(0.5), "unknown": LN(0.9)}, {"3": 0.0, " 9": LN(0.5)}, {"the": 0.0},
                 {"2": -1000.0, "4": -1000.0}]
    backend = ScriptedBackend([PromptLogprobsResponse(positions, Usage(100, 0))], ALL)
    sim = _sim(backend, top_logprobs=7, records_per_call=2)
    out = _run(sim, [["a", "b", "c"], ["d"]])
    assert out.values[0] == [pytest.approx(5.0), 3.0, 0.0] and math.isnan(out.values[1][0])
    prompt, offsets = simulator_completion_prompt("digits", [["a", "b", "c"], ["d"]])
    assert backend.requests == [{"prompt": prompt, "offsets": offsets, "top_k": 7}]
    assert (out.calls, out.usage) == (1, Usage(100, 0))


def test_wrong_number_of_positions_is_retried_then_fails():
    short = PromptLogprobsResponse([{"0": 0.0}], Usage(10, 0))
    backend = ScriptedBackend([short] * 3, ALL)
    sim = _sim(backend)
    with pytest.raises(MalformedAnswerError, match="1 positions for 2"):
        _run(sim, [["a", "b"]])
    assert len(backend.requests) == 3 and sim.usage == Usage(30, 0)


# --- mode 2: generated logprobs ----------------------------------------------------------------------------

GENERATED = [TokenAlternatives("a", 0.0), TokenAlternatives("\t", 0.0),
             TokenAlternatives("7", LN(0.5), {"7": LN(0.5), "9": LN(0.5), "x": LN(0.1)}),
             TokenAlternatives("\n", 0.0), TokenAlternatives("⏎", 0.0),
             TokenAlternatives("\t5", LN(0.5), {"\t5": LN(0.5), "\t3": LN(0.5), "2": LN(0.01)}),  # tab merged in
             TokenAlternatives("\n", 0.0), TokenAlternatives(")", 0.0), TokenAlternatives("\t", 0.0),
             TokenAlternatives("10", 0.0, {"10": 0.0})]


@pytest.mark.parametrize("spaced,middle", [(False, 2.0), (True, (5 * 0.5 + 3 * 0.5 + 2 * 0.01) / 1.01)])
def test_generated_logprob_mode_reads_the_value_tokens_alternatives(spaced, middle):
    backend = ScriptedBackend([ChatResponse("".join(p.token for p in GENERATED), Usage(50, 9), GENERATED)],
                              CHAT_LOGPROBS)
    sim = _sim(backend, top_logprobs=5, spaced_digits=spaced)
    out = _run(sim, [["a", "\n", ")"]])
    # a tab merged into the value ("\t5") is not a value string unless spaced_digits counts it
    assert out.values == [[pytest.approx(8.0), pytest.approx(middle), 10.0]]
    assert backend.requests[0]["top_logprobs"] == 5 and backend.requests[0]["temperature"] == 0.0
    assert sim.settings()["ten_from"] == "next_generated_token" and sim.settings()["spaced_digits"] is spaced


def test_generated_logprob_reads_10_from_the_token_after_a_written_1():
    # the model wrote "1" then "0": P("1") .6 splits by the next token's alternatives ("0" .5, "\n" .5):
    # P(10) = .3, P(1) = .3, P(0) = .4 -> 3.3; the second value "1" + "\n" splits .8 / .2 the other way
    pieces = [TokenAlternatives("a", 0.0), TokenAlternatives("\t", 0.0),
              TokenAlternatives("1", LN(0.6), {"1": LN(0.6), "0": LN(0.4)}),
              TokenAlternatives("0", LN(0.5), {"0": LN(0.5), "\n": LN(0.5)}), TokenAlternatives("\n", 0.0),
              TokenAlternatives("b", 0.0), TokenAlternatives("\t", 0.0),
              TokenAlternatives("1", 0.0, {"1": 0.0}),
              TokenAlternatives("\n", LN(0.8), {"\n": LN(0.8), "0": LN(0.2)})]
    backend = ScriptedBackend([ChatResponse("".join(p.token for p in pieces), Usage(5, 9), pieces)], CHAT_LOGPROBS)
    out = _run(_sim(backend), [["a", "b"]])
    assert out.values == [[pytest.approx(3.3), pytest.approx(10 * 0.2 + 1 * 0.8)]]


def test_generated_logprob_mode_without_logprobs_is_malformed():
    backend = ScriptedBackend([ChatResponse("a\t3", Usage(5, 2))] * 3, CHAT_LOGPROBS)
    with pytest.raises(MalformedAnswerError, match="no logprobs"):
        _run(_sim(backend), [["a"]])


def test_misaligned_generated_answer_fails_after_retries_and_is_never_zeros():
    wrong = [TokenAlternatives("b", 0.0), TokenAlternatives("\t", 0.0), TokenAlternatives("0", 0.0, {"0": 0.0})]
    backend = ScriptedBackend([ChatResponse("b\t0", Usage(5, 2), wrong)] * 3, CHAT_LOGPROBS)
    sim = _sim(backend)
    with pytest.raises(MalformedAnswerError, match="misaligned"):
        _run(sim, [["a"]])
    assert len(backend.requests) == 3 and sim.usage == Usage(15, 6)


# --- mode 3: logprob-free ----------------------------------------------------------------------------------
def test_logprob_free_mode_parses_integers():
    backend = ScriptedBackend(["<text 1>\na\t7\n⏎\t0\n)\t10\n</text 1>"], CHAT)
    out = _run(_sim(backend), [["a", "\n", ")"]])
    assert out.values == [[7.0, 0.0, 10.0]]
    assert backend.requests[0]["top_logprobs"] is None


def test_truncated_answer_is_retried_with_a_new_sample():
    backend = ScriptedBackend(["a\t7\n⏎\t0\n", "a\t7\n⏎\t0\n)\t10"], CHAT)
    sim = _sim(backend)
    out = _run(sim, [["a", "\n", ")"]])
    assert out.values == [[7.0, 0.0, 10.0]] and out.calls == 2
    assert [(r["temperature"], r["seed"]) for r in backend.requests] == [(0.0, None), (0.7, 2)]
    assert out.usage == Usage(20, 10) == sim.usage  # the failed attempt was paid for too


def test_records_per_call_batches_records_into_one_prompt():
    backend = ScriptedBackend(["<text 1>\na\t1\n</text 1>\n<text 2>\nb\t2\n</text 2>", "c\t3"], CHAT)
    out = _run(_sim(backend, records_per_call=2), [["a"], ["b"], ["c"]])
    assert out.values == [[1.0], [2.0], [3.0]] and out.calls == 2
    assert "<text 2>\nb\n</text 2>" in backend.requests[0]["messages"][-1]["content"]


def test_settings_name_the_mode_knobs_and_how_values_are_read():
    sim = _sim(ScriptedBackend([], CHAT), records_per_call=3)
    assert sim.settings() == {"mode": "logprob_free", "top_logprobs": None, "records_per_call": 3,
                              "prompt_version": "ns-1"}
    asyncio.run(sim.prepare())
    assert sim.settings() == {"mode": "logprob_free", "top_logprobs": None, "records_per_call": 3,
                              "prompt_version": "ns-1", "ten_from": "answer_text", "digits_split": None,
                              "spaced_digits": False}
    assert _sim(ScriptedBackend([], ALL)).settings()["top_logprobs"] == 15


# --- the rule-following stub in every mode ---------------------------------------------------------------
@pytest.mark.parametrize("caps,hit,miss", [(ALL, 9.5, 0.5), (CHAT_LOGPROBS, 9.5, 0.5), (CHAT, 10.0, 0.0)])
def test_rule_stub_simulates_the_named_rule_in_every_mode(caps, hit, miss):
    tokens = [["f", "(", "x", ")", "\n"], [" 1", ")", " the"]]
    out = _run(_sim(RuleStubBackend(caps)), tokens, explanation="closing parentheses")
    expected = [[hit if ")" in t else miss for t in rec] for rec in tokens]
    assert out.values == [[pytest.approx(v) for v in rec] for rec in expected]


# --- "10" written as "1" + "0" (docs/method.md §5) -------------------------------------------------------
BRANCHES = Capabilities(chat=True, chat_logprobs=True, prompt_logprobs=True, prompt_branches=True)


class DigitSplitting(ScriptedBackend):
    """A scripted backend whose tokenizer writes "10" as "1" + "0", and which takes `branch`."""

    def __init__(self, answers, capabilities, tokens=("a", "\t", "1", "0", "\n")):
        super().__init__(answers, capabilities)
        self.tokens, self.tokenized = list(tokens), []

    async def tokenize(self, text):
        self.tokenized.append(text)
        return self.tokens

    async def prompt_logprobs(self, prompt, offsets, *, top_k, branch=None):
        response = await super().prompt_logprobs(prompt, offsets, top_k=top_k)
        self.requests[-1]["branch"] = branch
        return response


def test_prompt_logprob_asks_for_the_branch_after_1_and_splits_its_mass():
    positions = [{"1": LN(0.5), "0": LN(0.5)}, {"1": LN(0.5), "0": LN(0.5)}, {"3": 0.0}]
    branches = [{"0": LN(0.8), "\n": LN(0.2)}, {"\n": 0.0}, None]  # None: "1" is not in that top-k
    backend = DigitSplitting([PromptLogprobsResponse(positions, Usage(9, 0), branches=branches)], BRANCHES)
    sim = _sim(backend)
    out = _run(sim, [["a", "b", "c"]])
    # P(10) = .4, P(1) = .1, P(0) = .5 -> 4.1; then "1" followed by a line end: all of its .5 is the value 1
    assert out.values == [[pytest.approx(4.1), pytest.approx(0.5), 3.0]]
    assert backend.requests[0]["branch"] == "1" and backend.tokenized == ["a\t10\n"]
    assert sim.settings()["ten_from"] == "branch" and sim.settings()["digits_split"] is True


def test_a_missing_branch_where_1_is_likely_is_malformed_and_retried():
    bad = PromptLogprobsResponse([{"1": LN(0.5)}], Usage(9, 0), branches=[None])
    good = PromptLogprobsResponse([{"1": LN(0.5)}], Usage(9, 0), branches=[{"0": 0.0}])
    backend = DigitSplitting([bad, good], BRANCHES)
    out = _run(_sim(backend), [["a"]])
    assert out.values == [[10.0]] and out.calls == 2


def test_a_whole_10_tokenizer_asks_for_no_branch():
    backend = DigitSplitting([PromptLogprobsResponse([{"10": 0.0}], Usage(9, 0))], BRANCHES,
                             tokens=["a", "\t", "10", "\n"])
    sim = _sim(backend)
    assert _run(sim, [["a"]]).values == [[10.0]]
    assert backend.requests[0]["branch"] is None
    assert (sim.settings()["ten_from"], sim.settings()["digits_split"]) == ("token", False)


def test_prompt_logprob_without_branches_is_refused_for_a_digit_splitting_tokenizer():
    no_branches = Capabilities(chat=True, chat_logprobs=True, prompt_logprobs=True)
    forced = _sim(DigitSplitting([], no_branches), mode="prompt_logprob")
    with pytest.raises(UnsupportedError, match=r'writes "10" as "1" \+ "0".*every 10 would be read as 1'):
        _run(forced, [["a"]])
    # auto passes it over for the next mode, and the row says so
    chat = ChatResponse("a\t3", Usage(5, 2), [TokenAlternatives("a", 0.0), TokenAlternatives("\t", 0.0),
                                              TokenAlternatives("3", 0.0, {"3": 0.0})])
    auto = _sim(DigitSplitting([chat], no_branches))
    assert auto.mode == "prompt_logprob"
    assert _run(auto, [["a"]]).values == [[3.0]]
    assert auto.mode == "generated_logprob" and auto.settings()["mode"] == "generated_logprob"
    assert "prompt_logprob" in auto.settings()["refused_modes"]


def test_the_tokenizer_is_asked_once_per_backend():
    backend = DigitSplitting([PromptLogprobsResponse([{"0": 0.0}], Usage(1, 0), branches=[{"0": 0.0}])] * 2,
                             BRANCHES)
    _run(_sim(backend), [["a"]])
    _run(_sim(backend), [["a"]])
    assert backend.tokenized == ["a\t10\n"]
