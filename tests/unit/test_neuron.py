"""One neuron end to end (workers.method.neuron.explain_and_score): rows, best-of-k, failures, usage."""
import asyncio
import json

import numpy as np
import pytest

from schemas.config import ConfigError, SweepConfig
from schemas.failures import FailureReason
from schemas.tables import to_table
from testing.stubs import RuleStubBackend, ScriptedBackend, planted_neuron, pydoc_windows
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
from workers.method.neuron import explain_and_score
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
    assert set(rows) == {"correlation", "detection", "fuzzing", "embedding"}
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
    assert sim.calls == 1  # the detection call only
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
