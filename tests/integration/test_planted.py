"""Planted neurons on the real default corpus (the standard library's help topics): a synthetic neuron that
fires on a rule must score its true explanation clearly above a wrong one, in every simulator mode, when the
simulator follows the rule it is told (the deterministic stub). bench/planted.py asks the same of SmolLM2."""
import asyncio

import pytest

from schemas.config import Simulator as SimulatorConfig
from schemas.config import SweepConfig
from testing.stubs import RULES, RuleStubBackend, planted_neuron, pydoc_windows
from workers.llm.backends.base import Capabilities
from workers.method.neuron import explain_and_score
from workers.method.scoring import correlation_score, split_records
from workers.method.simulator import NeuronSimulator

MODES = {"prompt_logprob": Capabilities(chat=True, chat_logprobs=True, prompt_logprobs=True),
         "generated_logprob": Capabilities(chat=True, chat_logprobs=True),
         "logprob_free": Capabilities(chat=True)}
PLANTED = {"digits": "comma", "closing_paren": "digits", "the": "of"}  # rule -> a wrong explanation's rule


@pytest.fixture(scope="module")
def windows():
    return pydoc_windows(seq_len=64)


def _valid_score(records, explanation, caps):
    valid = split_records(records.top, records.random, 5)["valid"]
    sim = asyncio.run(NeuronSimulator(RuleStubBackend(caps), SimulatorConfig()).simulate(
        explanation, [r.tokens for r in valid]))
    return correlation_score([r.activations for r in valid], sim.values)


def test_the_corpus_is_the_real_default_text(windows):
    assert len(windows) > 1000 and all(len(w) == 64 for w in windows)
    assert any("def" in "".join(w) for w in windows[:200])


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("rule,wrong", list(PLANTED.items()))
def test_true_explanation_scores_clearly_above_a_wrong_one(windows, rule, wrong, mode):
    records = planted_neuron(rule, windows, layer=0, neuron=1)
    true_score = _valid_score(records, RULES[rule].phrase, MODES[mode])
    wrong_score = _valid_score(records, RULES[wrong].phrase, MODES[mode])
    assert true_score > 0.9
    assert wrong_score is None or true_score - wrong_score > 0.5


@pytest.mark.parametrize("rule", list(PLANTED))
def test_the_stub_explainer_recovers_the_planted_rule_end_to_end(windows, rule):
    records = planted_neuron(rule, windows, layer=2, neuron=5)
    res = asyncio.run(explain_and_score(records, RuleStubBackend(), RuleStubBackend(),
                                       SweepConfig(scorers=["correlation", "detection", "fuzzing"])))
    assert res.error is None and res.explanation == RULES[rule].phrase
    rows = {r["scorer"]: r for r in res.score_rows}
    assert rows["correlation"]["score"] > 0.9 and rows["fuzzing_active"]["score"] >= 0.9
    detection = rows["detection"]
    assert detection["score"] == 1.0 or detection["null_reason"].startswith("no non-activating windows")
