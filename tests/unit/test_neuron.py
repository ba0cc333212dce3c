"""One neuron end to end (workers.method.neuron.explain_and_score): rows, best-of-k, failures, usage."""
import asyncio
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.config import ConfigError, SweepConfig
from schemas.failures import FailureReason
from schemas.tables import to_table
from support.two_sided import two_sided_neuron
from testing.stubs import RULES, RuleStubBackend, ScriptedBackend, planted_neuron, pydoc_windows
from workers.llm.backends.base import (
    Capabilities,
    ChatResponse,
    LLMError,
    PermanentLLMError,
    RateLimitedError,
    TransientLLMError,
    UnsupportedError,
    Usage,
)
from workers.method.neuron import explain_and_score, negative_side
from workers.method.prompts import EXPLAINER_SYSTEM, unescape_token
from workers.method.records import ActivationRecord, NeuronRecords
from workers.method.scorers import SCORERS
from workers.method.scorers.base import Scorer


@pytest.fixture(scope="module")
def digits_neuron():
    return planted_neuron("digits", pydoc_windows(), layer=3, neuron=17)


class KeywordEmbedder:
    """[1, 0] for texts with a digit or naming digits, else [0, 1]."""
    name = "keyword"

    def embed(self, texts):
        return np.array([[1.0, 0.0] if "digit" in t or any(c.isdigit() for c in t) else [0.0, 1.0] for t in texts])


def _run(records, explainer_backend, simulator_backend, embedder=None, **cfg):
    return asyncio.run(explain_and_score(records, explainer_backend, simulator_backend, SweepConfig(**cfg),
                                         embedder=embedder))


def test_end_to_end_rows_fit_the_tables(digits_neuron):
    res = _run(digits_neuron, RuleStubBackend(), RuleStubBackend(), KeywordEmbedder(),
               scorers=["correlation", "detection", "fuzzing", "embedding"])
    assert res.error is None and res.reason is None
    assert res.explanation == "digits and numbers written with digits"
    to_table("explanations", res.explanation_rows)
    to_table("scores", res.score_rows)
    [expl] = res.explanation_rows
    assert (expl["layer"], expl["neuron"], expl["candidate"], expl["selected"]) == (3, 17, 0, True)
    rows = {r["scorer"]: r for r in res.score_rows}
    assert set(rows) == {"correlation", "detection", "fuzzing", "fuzzing_active", "embedding"}
    corr = rows["correlation"]
    assert corr["score"] > 0.9 and corr["r2"] > 0.8 and corr["simulator_mode"] == "prompt_logprob"
    valid_ids = [r.seq_id for r in digits_neuron.top[2:20:4]] + [r.seq_id for r in digits_neuron.random[1:15:3]]
    assert corr["seq_ids"] == valid_ids and len(corr["simulated"]) == 10 and len(corr["per_sequence"]) == 10
    settings = json.loads(corr["settings"])
    assert settings["mode"] == "prompt_logprob" and settings["split"] == "valid" and settings["top_logprobs"] == 15
    assert rows["detection"]["score"] == 1.0 and rows["embedding"]["score"] == 1.0
    assert res.usage["explainer"].prompt_tokens > 0 and res.usage["simulator"].prompt_tokens > 0


def test_best_of_k_keeps_the_candidate_with_the_best_calibration_score(digits_neuron):
    class ByCandidate(ScriptedBackend):  # candidate i samples with seed i * 3 + attempt
        async def chat(self, messages, *, max_tokens, temperature=0.0, top_logprobs=None, seed=None):
            self.requests.append(seed)
            return ChatResponse({1: "commas", 4: "", 5: "", 6: "", 7: "digits"}[seed], Usage(10, 5))

    res = _run(digits_neuron, ByCandidate([]), RuleStubBackend(), explainer={"best_of": 3})
    assert res.error is None
    assert [(r["candidate"], r["explanation"], r["selected"]) for r in res.explanation_rows] == [
        (0, "commas", False), (2, "digits", True)]
    assert len(res.failed_candidates) == 1 and res.failed_candidates[0].startswith("candidate 1:")
    [corr] = res.score_rows
    assert corr["candidate"] == 2
    cal = json.loads(corr["settings"])["candidate_calibration_scores"]
    assert cal["2"] > 0.9 > cal["0"]


def test_no_usable_explanation_fails_the_neuron_without_rows(digits_neuron):
    res = _run(digits_neuron, ScriptedBackend(["", " ", "."]), RuleStubBackend())
    assert res.error.startswith("layer 3 neuron 17: ExplanationFailed: no usable explanation")
    assert res.reason == FailureReason.MALFORMED
    assert res.explanation_rows == [] and res.score_rows == []
    assert res.usage["explainer"] == Usage(30, 15) and res.usage["simulator"] == Usage()


def test_too_few_records_names_the_neuron_and_counts(digits_neuron):
    short = planted_neuron("digits", pydoc_windows(max_windows=40), layer=1, neuron=2, top_k=12, n_random=15)
    res = _run(short, RuleStubBackend(), RuleStubBackend())
    assert "layer 1 neuron 2" in res.error and "have 12 top and 15 random" in res.error
    assert res.reason == FailureReason.RECORDS


def test_a_simulator_that_never_aligns_fails_the_neuron(digits_neuron):
    sim = ScriptedBackend(["garbage\t0\n"] * 50, Capabilities(chat=True))
    res = _run(digits_neuron, RuleStubBackend(), sim)
    assert "MalformedAnswerError" in res.error and res.score_rows == []
    assert res.reason == FailureReason.MALFORMED
    assert res.usage["simulator"].prompt_tokens > 0  # the failed calls still count


def test_a_permanent_backend_error_fails_the_neuron(digits_neuron):
    res = _run(digits_neuron, ScriptedBackend([PermanentLLMError("403 forbidden", status=403)]), RuleStubBackend())
    assert "PermanentLLMError: 403 forbidden" in res.error and res.reason == FailureReason.PERMANENT


def test_forcing_a_mode_the_backend_lacks_fails_with_the_reason(digits_neuron):
    res = _run(digits_neuron, RuleStubBackend(), RuleStubBackend(Capabilities(chat=True)),
               simulator={"mode": "prompt_logprob"})
    assert "UnsupportedError" in res.error and "prompt_logprob" in res.error
    assert res.reason == FailureReason.PERMANENT


@pytest.mark.parametrize("mode", ["generated_logprob", "logprob_free"])
def test_forced_chat_modes_are_recorded_with_the_score(digits_neuron, mode):
    res = _run(digits_neuron, RuleStubBackend(), RuleStubBackend(), simulator={"mode": mode, "records_per_call": 5})
    [corr] = res.score_rows
    assert corr["simulator_mode"] == mode and json.loads(corr["settings"])["records_per_call"] == 5
    assert corr["score"] > 0.9


def test_detection_only_skips_simulation(digits_neuron):
    sim = RuleStubBackend()
    res = _run(digits_neuron, RuleStubBackend(), sim, scorers=["embedding", "detection"])
    assert [r["scorer"] for r in res.score_rows] == ["embedding", "detection"]  # the configured order
    assert sim.calls == 4  # the detection calls only: 5 valid top + 15 quiet random windows, 5 per call
    emb = res.score_rows[0]
    assert emb["score"] is None and emb["null_reason"] == "no embedder given to the method"
    to_table("scores", res.score_rows)


# --- failure reasons travel with the exception ------------------------------------------------------------
@pytest.mark.parametrize("error, reason", [
    (RateLimitedError("429 after every retry"), FailureReason.RATE_LIMITED),
    (TransientLLMError("HTTP 503"), FailureReason.SERVER_ERROR),
    (TransientLLMError("no answer within 60s", reason=FailureReason.TIMEOUT), FailureReason.TIMEOUT),
    (TransientLLMError("connection refused", reason=FailureReason.CONNECTION), FailureReason.CONNECTION),
    (PermanentLLMError("HTTP 401"), FailureReason.PERMANENT),
    (UnsupportedError("no prompt logprobs"), FailureReason.PERMANENT),
    (LLMError("something else"), FailureReason.ERROR),
])
def test_the_error_that_fails_a_neuron_gives_its_reason(digits_neuron, error, reason):
    res = _run(digits_neuron, ScriptedBackend([error]), RuleStubBackend())
    assert res.reason == reason and res.error.endswith(f"{type(error).__name__}: {error}")


# --- the scorer loop ----------------------------------------------------------------------------------------
def test_a_failing_scorer_fails_the_neuron_and_cancels_the_others(digits_neuron, monkeypatch):
    events = []

    class Slow(Scorer):
        name = "slow"

        async def score(self, ctx):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                events.append("slow cancelled")
                raise
            return [{"scorer": self.name}]

    class Failing(Scorer):
        name = "failing"

        async def score(self, ctx):
            await asyncio.sleep(0)
            raise TransientLLMError("judge timed out", reason=FailureReason.TIMEOUT)

    monkeypatch.setitem(SCORERS, "slow", Slow)
    monkeypatch.setitem(SCORERS, "failing", Failing)

    async def run():
        result = await explain_and_score(digits_neuron, RuleStubBackend(), RuleStubBackend(),
                                         SweepConfig(scorers=["slow", "failing"]))
        events.append("returned")
        return result

    res = asyncio.run(run())
    assert res.error == "layer 3 neuron 17: TransientLLMError: judge timed out"
    assert res.reason == FailureReason.TIMEOUT and res.score_rows == [] and res.explanation_rows == []
    assert events == ["slow cancelled", "returned"]  # stopped before the neuron's result came back


def test_a_scorer_row_with_a_column_the_table_lacks_is_an_error(digits_neuron, monkeypatch):
    class Moody(Scorer):
        name = "moody"

        async def score(self, ctx):
            return [{"scorer": self.name, "score": 0.5, "mood": "fine"}]

    monkeypatch.setitem(SCORERS, "moody", Moody)
    with pytest.raises(ValueError, match=r"scorer 'moody' returned column\(s\) mood that the scores table"):
        _run(digits_neuron, RuleStubBackend(), RuleStubBackend(), scorers=["moody"])


def test_an_unregistered_scorer_is_refused_before_any_call(digits_neuron):
    explainer = ScriptedBackend([])
    with pytest.raises(ConfigError, match="scorers: 'vibes' is not a scorer"):
        _run(digits_neuron, explainer, RuleStubBackend(), scorers=["vibes"])
    assert explainer.requests == []


# --- both signs (docs/method.md §1 "Both signs") --------------------------------------------------------------------
def _rec(seq_id, acts, kind, rank=0):
    return ActivationRecord(seq_id, [f"t{i}" for i in range(len(acts))], list(acts), kind, rank)


def _signed(top_max, bottoms, random_acts=(0.5, -0.5)):
    return NeuronRecords(2, 5, top=[_rec(1, [0.0, top_max], "top"), _rec(2, [1.0, 0.0], "top", 1)],
                         bottom=[_rec(3 + i, a, "bottom", i) for i, a in enumerate(bottoms)],
                         random=[_rec(9, random_acts, "random")])


@pytest.mark.parametrize("top_max, bottom, records, explained", [
    (4.0, [-2.0, 1.0], {}, True),                         # |min| = 0.5 x max: the boundary counts
    (4.0, [-1.99, 1.0], {}, False),                       # just short of it
    (4.0, [-1.0, 1.0], {"negative_ratio": 0.25}, True),
    (4.0, [-0.01, 0.0], {"negative_ratio": 0.0}, True),  # 0: whenever it goes below 0 ...
    (4.0, [0.0, 0.25], {"negative_ratio": 0.0}, False),  # ... and never when it does not
    (4.0, [-3.0, 0.0], {"negative": "off"}, False),
    (4.0, [float("-inf"), -1.0], {}, False),              # non-finite values take no part
    (4.0, [float("nan"), -2.5], {}, True),
    (0.5, [-0.3, 0.0], {}, False),                        # the maximum is over every top record: 1.0, not 0.5
])
def test_the_negative_side_is_explained_when_its_minimum_reaches_the_ratio_of_the_maximum(
        top_max, bottom, records, explained):
    assert (negative_side(_signed(top_max, [bottom]), SweepConfig(records=records)) is not None) is explained


def test_the_negative_side_is_the_bottom_records_negated_as_top_and_the_random_ones_negated():
    recs = _signed(4.0, [[-3.0, 1.0], [-0.5, 0.25]], random_acts=(0.5, -0.75))
    neg = negative_side(recs, SweepConfig())
    assert [(r.seq_id, r.kind, r.rank, r.activations) for r in neg.top] == [
        (3, "top", 0, [3.0, -1.0]), (4, "top", 1, [0.5, -0.25])]  # rank 0, the most negative window, first
    assert [(r.seq_id, r.kind, r.activations, r.tokens) for r in neg.random] == [(9, "random", [-0.5, 0.75],
                                                                                   ["t0", "t1"])]
    assert (neg.layer, neg.neuron, neg.bottom, neg.quantile) == (2, 5, [], [])
    assert recs.bottom[0].activations == [-3.0, 1.0]  # the neuron's own records are left as they were
    assert negative_side(NeuronRecords(2, 5, top=recs.top, random=recs.random), SweepConfig()) is None  # no bottom


finite = st.floats(-100, 100, allow_nan=False, width=32)


@settings(max_examples=200, deadline=None)
@given(top=st.lists(st.lists(finite, min_size=1, max_size=4), min_size=1, max_size=4),
       bottom=st.lists(st.lists(finite, min_size=1, max_size=4), min_size=1, max_size=4),
       ratio=st.floats(0, 3, allow_nan=False))
def test_the_rule_and_the_negation_hold_for_any_records(top, bottom, ratio):
    recs = NeuronRecords(0, 0, top=[_rec(i, a, "top", i) for i, a in enumerate(top)],
                         bottom=[_rec(50 + i, a, "bottom", i) for i, a in enumerate(bottom)])
    low, high = min(min(a) for a in bottom), max(max(a) for a in top)
    neg = negative_side(recs, SweepConfig(records={"negative_ratio": ratio}))
    assert (neg is not None) == (low < 0 and -low >= ratio * max(high, 0.0))
    if neg is not None:
        assert [[-x for x in r.activations] for r in neg.top] == bottom
        assert [r.seq_id for r in neg.top] == [50 + i for i in range(len(bottom))]


class RecordingStub(RuleStubBackend):
    """The rule stub, keeping every explainer prompt it answered."""

    def __init__(self):
        super().__init__()
        self.explainer_prompts: list[str] = []

    def answer(self, messages):
        if messages[0]["content"] == EXPLAINER_SYSTEM:
            self.explainer_prompts.append(messages[-1]["content"])
        return super().answer(messages)


def _prompt_values(prompt: str, match) -> list[int]:
    """The values the explainer was shown for the tokens that `match` (lines `token<TAB>value`)."""
    pairs = [line.rsplit("\t", 1) for line in prompt.split("\n") if "\t" in line]
    return [int(v) for t, v in pairs if v.strip().isdigit() and match(unescape_token(t))]


def test_a_two_sided_neuron_has_each_side_explained_by_its_own_rule():
    records = two_sided_neuron("digits", "comma", pydoc_windows(), layer=3, neuron=17)
    explainer = RecordingStub()
    positive = _run(records, explainer, RuleStubBackend())
    negative = _run(negative_side(records, SweepConfig()), explainer, RuleStubBackend(),
                    scorers=["correlation", "detection"])
    assert positive.explanation == "digits and numbers written with digits" and negative.explanation == "commas"
    detection = negative.score_rows[1]
    assert detection["scorer"] == "detection" and detection["score"] == 1.0  # a judge scorer works on it unchanged
    # each side scores well on its own records (commas pull the positive side's correlation below 0.9, and digits the
    # negative side's: a simulation of one side predicts 0 where the other side moves)
    assert positive.score_rows[0]["score"] > 0.7 and negative.score_rows[0]["score"] > 0.7
    valid = [r.seq_id for r in records.bottom[2:20:4]] + [r.seq_id for r in records.random[1:15:3]]
    assert negative.score_rows[0]["seq_ids"] == valid  # scored on the bottom windows and the random ones
    pos_prompt, neg_prompt = explainer.explainer_prompts
    comma, digit = RULES["comma"].match, RULES["digits"].match
    # the negative side's explainer saw the bottom windows with their commas high, digits (positive) at 0
    assert max(_prompt_values(neg_prompt, comma)) == 10 and set(_prompt_values(neg_prompt, digit)) <= {0}
    assert max(_prompt_values(pos_prompt, digit)) == 10 and set(_prompt_values(pos_prompt, comma)) == {0}
