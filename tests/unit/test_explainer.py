"""The explainer (docs/method.md §4): prompt from the train records, cleanup, retries, best-of-k."""
import asyncio

import pytest

from schemas.config import Explainer as ExplainerConfig
from schemas.failures import FailureReason
from testing.stubs import ScriptedBackend
from workers.llm.backends.base import Capabilities, ChatResponse, PermanentLLMError, Usage
from workers.method.explainer import Candidate, ExplanationFailed, NeuronExplainer, explainer_prompt
from workers.method.records import ActivationRecord

TRAIN = [ActivationRecord(1, ["a", " b"], [1.0, 2.0]), ActivationRecord(2, ["\n", "c"], [4.0, -1.0])]


def _explain(backend, **cfg):
    explainer = NeuronExplainer(backend, ExplainerConfig(**cfg))
    return explainer, asyncio.run(explainer.explain(TRAIN))


def test_prompt_normalizes_over_all_train_records_together():
    assert explainer_prompt(TRAIN)[-1]["content"].startswith(
        "Activations:\n<text 1>\na\t2\n b\t5\n</text 1>\n<text 2>\n⏎\t10\nc\t0\n</text 2>")


def test_one_explanation_at_temperature_zero_cleaned():
    backend = ScriptedBackend(["The main thing this neuron does is find letters after a space."])
    explainer, [cand] = _explain(backend, max_tokens=40)
    assert (cand.index, cand.text, cand.error, cand.attempts) == (0, "letters after a space", None, 1)
    assert backend.requests[0]["temperature"] == 0.0 and backend.requests[0]["max_tokens"] == 40
    assert backend.requests[0]["messages"] == explainer_prompt(TRAIN)
    assert cand.usage == explainer.usage == Usage(10, 5)


def test_unusable_answers_are_retried_then_recorded_as_failed():
    backend = ScriptedBackend(["", "The main thing this neuron does is find.", "..."])
    explainer, [cand] = _explain(backend)
    assert cand.text is None and "after 3 attempts" in cand.error and cand.reason == FailureReason.MALFORMED
    assert [(r["temperature"], r["seed"]) for r in backend.requests] == [(0.0, None), (0.7, 2), (0.7, 3)]
    assert explainer.usage == Usage(30, 15)  # failed calls are paid for and counted


def test_an_echoed_worked_example_or_bare_chatter_is_retried_as_malformed():
    backend = ScriptedBackend(["The main thing this neuron does is find words that signal doubt or uncertainty "
                               "about a statement.", "Sure! Here's my answer:", "Sure! Here's my answer:\ncommas"])
    _, [cand] = _explain(backend)
    assert (cand.text, cand.attempts) == ("commas", 3)


def test_after_an_echoed_worked_example_the_retry_is_asked_without_worked_examples():
    """Small models copy whichever worked example they see: the retry shows them none."""
    backend = ScriptedBackend(["The main thing this neuron does is find years written as numbers, most strongly "
                               "on the final digits of the year, mostly.", "The main thing this neuron does is "
                               "find letters after a space."])
    _, [cand] = _explain(backend)
    assert (cand.text, cand.attempts) == ("letters after a space", 2)
    first, second = (r["messages"] for r in backend.requests)
    assert first == explainer_prompt(TRAIN) and len(first) == 2 + 2 * 3  # system, three worked examples, records
    assert second == [first[0], first[-1]] == explainer_prompt(TRAIN, worked_examples=False)


def test_without_worked_examples_the_first_try_shows_none():
    backend = ScriptedBackend(["The main thing this neuron does is find letters after a space."])
    _, [cand] = _explain(backend, worked_examples=False)
    assert cand.text == "letters after a space"
    assert backend.requests[0]["messages"] == explainer_prompt(TRAIN, worked_examples=False)


def test_a_retry_can_succeed():
    backend = ScriptedBackend(["   ", "commas in lists"])
    _, [cand] = _explain(backend)
    assert (cand.text, cand.attempts) == ("commas in lists", 2)


class SeededBackend:
    """Answers by the request's seed, so concurrent candidates are told apart."""
    provider, model, capabilities = "seeded", "seeded", Capabilities(chat=True)

    def __init__(self, by_seed):
        self.by_seed, self.requests = by_seed, []

    async def chat(self, messages, *, max_tokens, temperature=0.0, top_logprobs=None, seed=None):
        self.requests.append((temperature, seed))
        return ChatResponse(self.by_seed[seed], Usage(10, 5))

    async def prompt_logprobs(self, prompt, offsets, *, top_k):
        raise NotImplementedError

    async def aclose(self):
        return None


def test_best_of_k_samples_k_distinct_candidates_at_temperature_one():
    # seeds: candidate i, attempt n -> i * 3 + n
    backend = SeededBackend({1: "digits", 4: "", 5: "", 6: "", 7: "closing parentheses"})
    _, cands = _explain(backend, best_of=3)
    assert [(c.index, c.text) for c in cands] == [(0, "digits"), (1, None), (2, "closing parentheses")]
    assert "after 3 attempts" in cands[1].error
    assert sorted(backend.requests) == [(1.0, s) for s in (1, 4, 5, 6, 7)]


def test_backend_errors_propagate_to_the_caller():
    with pytest.raises(PermanentLLMError, match="401 unauthorized"):
        _explain(ScriptedBackend([PermanentLLMError("401 unauthorized", status=401)]))


def test_explanation_failed_names_every_candidate_and_carries_their_reason():
    failed = [Candidate(0, None, "no answer within 60s", FailureReason.TIMEOUT),
              Candidate(2, None, "answer stops early (after 3 attempts)", FailureReason.MALFORMED)]
    err = ExplanationFailed.from_candidates(failed)
    assert str(err) == ("no usable explanation: candidate 0: no answer within 60s; "
                        "candidate 2: answer stops early (after 3 attempts)")
    assert err.reason == FailureReason.TIMEOUT and not err.retryable  # the first candidate's
    assert ExplanationFailed.from_candidates([Candidate(0, None, "?")]).reason == FailureReason.MALFORMED
