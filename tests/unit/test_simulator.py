"""The simulator's three modes (SPEC.md §5): mode choice, exact predictions, misaligned and truncated answers."""
import asyncio
import math

import pytest

from schemas.config import Simulator as SimulatorConfig
from workers.llm.backends.base import (Capabilities, ChatResponse, PromptLogprobsResponse, TokenAlternatives,
                                   UnsupportedError, Usage)
from workers.method.prompts import MalformedAnswerError, simulator_completion_prompt
from workers.method.simulator import NeuronSimulator, choose_mode
from testing.stubs import RuleStubBackend, ScriptedBackend

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
    with pytest.raises(UnsupportedError):
        choose_mode(ScriptedBackend([], Capabilities(chat=False)))


# --- mode 1: prompt logprobs -------------------------------------------------------------------------------
def test_prompt_logprob_mode_takes_expected_values_at_each_placeholder():
    positions = [{"0": LN(0.5), "10": LN(0.5), "unknown": LN(0.9)}, {" 3": 0.0}, {"the": 0.0},
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

def test_generated_logprob_mode_reads_the_value_tokens_alternatives():
    pieces = [TokenAlternatives("a", 0.0), TokenAlternatives("\t", 0.0),
              TokenAlternatives("7", LN(0.5), {"7": LN(0.5), "9": LN(0.5), "x": LN(0.1)}),
              TokenAlternatives("\n", 0.0), TokenAlternatives("⏎", 0.0),
              TokenAlternatives("\t5", LN(0.5), {"\t5": LN(0.5), "\t3": LN(0.5)}),  # tab merged into the value
              TokenAlternatives("\n", 0.0), TokenAlternatives(")", 0.0), TokenAlternatives("\t", 0.0),
              TokenAlternatives("10", 0.0, {"10": 0.0})]
    backend = ScriptedBackend([ChatResponse("".join(p.token for p in pieces), Usage(50, 9), pieces)], CHAT_LOGPROBS)
    out = _run(_sim(backend, top_logprobs=5), [["a", "\n", ")"]])
    assert out.values == [[pytest.approx(8.0), pytest.approx(4.0), 10.0]]
    assert backend.requests[0]["top_logprobs"] == 5 and backend.requests[0]["temperature"] == 0.0


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


def test_settings_name_the_mode_and_knobs():
    sim = _sim(ScriptedBackend([], CHAT), records_per_call=3)
    assert sim.settings() == {"mode": "logprob_free", "top_logprobs": None, "records_per_call": 3,
                              "prompt_version": "ns-1"}
    assert _sim(ScriptedBackend([], ALL)).settings()["top_logprobs"] == 15


# --- the rule-following stub in every mode ---------------------------------------------------------------
@pytest.mark.parametrize("caps,hit,miss", [(ALL, 9.5, 0.5), (CHAT_LOGPROBS, 9.5, 0.5), (CHAT, 10.0, 0.0)])
def test_rule_stub_simulates_the_named_rule_in_every_mode(caps, hit, miss):
    tokens = [["f", "(", "x", ")", "\n"], [" 1", ")", " the"]]
    out = _run(_sim(RuleStubBackend(caps)), tokens, explanation="closing parentheses")
    expected = [[hit if ")" in t else miss for t in rec] for rec in tokens]
    assert out.values == [[pytest.approx(v) for v in rec] for rec in expected]
