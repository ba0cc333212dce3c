"""Scorers (docs/method.md §6): correlation columns, detection, fuzzing, embedding; the registry and the
example scorer of CONTRIBUTING.md."""
import asyncio
import json
import re
import types
from pathlib import Path

import numpy as np
import pytest

import workers.method.scorers as scorers_pkg
from schemas.config import ConfigError, SweepConfig
from schemas.tables import to_table
from testing.stubs import RuleStubBackend, ScriptedBackend
from workers.llm.backends.base import Capabilities, Usage
from workers.method import check_config
from workers.method.neuron import explain_and_score
from workers.method.records import ActivationRecord, NeuronRecords
from workers.method.scorers import SCORERS, check_scorer_names
from workers.method.scorers._common import NO_NEGATIVES
from workers.method.scorers.base import non_activating
from workers.method.scorers.correlation import correlation_columns
from workers.method.scorers.detection import detection_columns
from workers.method.scorers.embedding import embedding_columns
from workers.method.scorers.fuzzing import active_positions, fuzzing_columns

CHAT = Capabilities(chat=True)


def _rec(seq_id, tokens, acts, kind="top"):
    return ActivationRecord(seq_id, tokens, acts, kind)


# --- correlation -------------------------------------------------------------------------------------------
def test_correlation_columns_overall_top_random_and_per_record():
    valid = [_rec(1, ["a", "b"], [0.0, 1.0]), _rec(2, ["c", "d"], [2.0, 3.0]),
             _rec(3, ["e", "f"], [0.0, 0.0], "random")]
    sim = [[0.0, 1.0], [2.0, 3.0], [0.0, 5.0]]
    calibration = [_rec(4, ["g", "h", "i"], [0.0, 2.0, 4.0])]
    cols = correlation_columns(valid, sim, calibration, [[0.0, 1.0, 2.0]])
    # overall: true [0,1,2,3,0,0] (mean 1) vs sim [0,1,2,3,0,5] (mean 11/6):
    # co-deviation sum 3, squared deviation sums 8 and 678/36
    assert cols["score"] == pytest.approx(3 / np.sqrt(8 * 678 / 36))
    assert cols["score_top"] == pytest.approx(1.0)
    assert cols["score_random"] is None
    assert cols["per_sequence"] == [pytest.approx(1.0), pytest.approx(1.0), None]
    assert cols["null_reason"] == "score_random: constant true activations"
    # calibration fit true = 2 * sim: predictions [0,2,4,6,0,10] against [0,1,2,3,0,0]
    assert cols["_calibration"] == {"a": pytest.approx(2.0), "b": pytest.approx(0.0)}
    assert cols["r2"] == pytest.approx(1 - (0 + 1 + 4 + 9 + 0 + 100) / 14)
    assert cols["absdev"] == pytest.approx(1 - (0 + 1 + 2 + 3 + 0 + 10) / 6)
    assert cols["seq_ids"] == [1, 2, 3]


def test_split_without_random_records_says_so():
    valid = [_rec(1, ["a", "b"], [0.0, 1.0])]
    cols = correlation_columns(valid, [[0.0, 1.0]], valid, [[0.0, 1.0]])
    assert cols["score"] == pytest.approx(1.0)
    assert cols["null_reason"] == "score_random: no random records in the split"


def test_non_activating_windows_stay_at_or_below_zero():
    recs = [_rec(1, ["a"], [0.0], "random"), _rec(2, ["b"], [0.01], "random"), _rec(3, ["c"], [-2.0], "random")]
    assert [r.seq_id for r in non_activating(recs)] == [1, 3]


# --- detection ---------------------------------------------------------------------------------------------
PAREN = [_rec(i, ["f", "(", "x", ")", " and"], [0, 0, 0, 3.0, 0]) for i in range(1, 4)]
QUIET = [_rec(i, [" the", " cat", " sat", ","], [0, -0.1, 0, 0], "random") for i in range(10, 13)]


def _detect(backend, explanation, activating=PAREN, quiet=QUIET, **kw):
    return asyncio.run(detection_columns(backend, explanation, activating, quiet, seed=7, **kw))


def test_detection_with_a_true_explanation_separates_windows():
    cols, usage = _detect(RuleStubBackend(), "closing parentheses")
    assert cols["score"] == 1.0 and cols["null_reason"] is None
    assert cols["auc"] == pytest.approx(1.0)
    assert (cols["settings"]["n_positive"], cols["settings"]["n_negative"]) == (3, 3)
    assert sorted(cols["seq_ids"]) == [1, 2, 3, 10, 11, 12] and cols["seq_ids"] != [1, 2, 3, 10, 11, 12]
    assert usage.prompt_tokens > 0


def test_detection_with_a_wrong_explanation_scores_chance():
    cols, _ = _detect(RuleStubBackend(), "digits and numbers")  # says 0 everywhere
    assert cols["score"] == 0.5 and cols["auc"] == 0.5


def test_detection_without_logprobs_has_no_auc():
    cols, _ = _detect(RuleStubBackend(CHAT), "closing parentheses")
    assert cols["score"] == 1.0 and cols["auc"] is None


def test_detection_hand_worked_answer():
    backend = ScriptedBackend(["[1, 1, 1, 1, 1, 1]"])
    cols, _ = _detect(backend, "anything", batch_size=6)
    assert cols["score"] == 0.5  # every window called active: TPR 1, TNR 0
    assert cols["f1"] == pytest.approx(2 * 3 / (2 * 3 + 3))  # TP 3, FP 3, FN 0
    messages = backend.requests[0]["messages"]
    snippets = [ln for ln in messages[-1]["content"].splitlines() if ln.startswith("Snippet")]
    assert len(snippets) == 6 and snippets[0].startswith("Snippet 1: ")
    # the worked example comes first, as a user question and its answer
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user"]
    assert messages[2]["content"] == "[1, 0, 1, 0]" and "Snippet 4: " in messages[1]["content"]


def test_detection_asks_batch_size_windows_per_call_and_keeps_their_order():
    backend = ScriptedBackend(["[1, 1]", "[0, 0]", "[1, 0]"])
    cols, usage = _detect(backend, "anything", batch_size=2)
    assert len(backend.requests) == 3 and usage == Usage(30, 15)
    asked = [ln.split(": ", 1)[1] for r in backend.requests for ln in r["messages"][-1]["content"].splitlines()
             if ln.startswith("Snippet")]
    windows = {r.seq_id: "".join(r.tokens) for r in PAREN + QUIET}
    assert asked == [windows[s] for s in cols["seq_ids"]]  # answers line up with the scored windows
    labels = [1 if s < 10 else 0 for s in cols["seq_ids"]]
    answers = [1, 1, 0, 0, 1, 0]
    tpr = sum(a for a, y in zip(answers, labels) if y) / 3
    tnr = sum(1 - a for a, y in zip(answers, labels) if not y) / 3
    assert cols["score"] == pytest.approx((tpr + tnr) / 2)


def test_detection_retries_a_malformed_list_and_counts_every_call():
    spent = []
    backend = ScriptedBackend(["[1, 0]", "I think [1, 0, 1, 0, 1, 0]"])
    cols, usage = _detect(backend, "anything", spent=spent, batch_size=6)
    assert cols["score"] is not None and usage == Usage(20, 10) and len(spent) == 2


def test_detection_without_quiet_windows_is_null_and_calls_nothing():
    backend = ScriptedBackend([])
    cols, usage = _detect(backend, "anything", quiet=[])
    assert cols["score"] is None and cols["null_reason"] == NO_NEGATIVES and backend.requests == []


# --- fuzzing -----------------------------------------------------------------------------------------------
def test_active_positions_use_the_windows_own_scale():
    assert active_positions(_rec(1, list("abcd"), [0.0, 5.0, 10.0, 3.9])) == {1, 2}
    assert active_positions(_rec(1, list("abcd"), [0.0, 5.0, 10.0, 3.9]), 0.3) == {1, 2, 3}
    assert active_positions(_rec(1, list("ab"), [-1.0, 0.0])) == set()


def _fuzz(backend, activating=PAREN, non_activating=QUIET, **kw):
    by_kind, usage = asyncio.run(fuzzing_columns(backend, kw.pop("explanation", "closing parentheses"), activating,
                                                 non_activating, seed=3, **kw))
    return by_kind, usage


def test_fuzzing_scores_true_highlights_against_both_kinds_of_decoy():
    by_kind, _ = _fuzz(RuleStubBackend())
    assert list(by_kind) == ["standard", "active"]
    for kind, cols in by_kind.items():
        assert cols["score"] == 1.0 and cols["f1"] == 1.0 and cols["auc"] == pytest.approx(1.0), kind
        assert (cols["settings"]["n_positive"], cols["settings"]["n_negative"]) == (3, 3)
        assert cols["settings"]["decoys"] == kind and cols["settings"]["highlight"] == 0.4
    assert sorted(by_kind["standard"]["seq_ids"]) == [1, 2, 3, 10, 11, 12]
    assert sorted(by_kind["active"]["seq_ids"]) == [1, 1, 2, 2, 3, 3]  # each window right, and wrong


def test_fuzzing_never_shows_a_window_twice_in_one_call():
    backend = RecordingStub()
    windows = [_rec(i, [f" w{i}", "(", "x", ")"], [0, 0, 0, 3.0]) for i in range(1, 6)]
    by_kind, _ = _fuzz(backend, activating=windows, batch_size=2, decoys=["active"])  # each window right and wrong
    asked = [[ln.split(": ", 1)[1].replace("<<", "").replace(">>", "") for ln in m[-1]["content"].splitlines()
              if ln.startswith("Snippet")] for m in backend.asked]
    assert all(len(set(call)) == len(call) <= 2 for call in asked)
    assert sorted(t for call in asked for t in call) == sorted(f" w{i}(x)" for i in range(1, 6) for _ in "rw")
    assert by_kind["active"]["score"] == 1.0


class RecordingStub(RuleStubBackend):
    """The rule stub, keeping every question's messages."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.asked = []

    async def chat(self, messages, **kw):
        self.asked.append(messages)
        return await super().chat(messages, **kw)


def test_fuzzing_prompt_highlights_the_active_token_and_decoys_elsewhere():
    backend = RecordingStub()
    by_kind, _ = _fuzz(backend, activating=PAREN[:1], non_activating=[_rec(9, ["p", "q", "r"], [0.1, 0, 0])])
    assert len(backend.asked) == 2  # window 1 twice (right and wrong): never in the same call
    shown = sorted(ln.split(": ", 1)[1] for m in backend.asked for ln in m[-1]["content"].splitlines()
                   if ln.startswith("Snippet"))
    active = [t for t in shown if t.replace("<<", "").replace(">>", "") == "f(x) and"]
    assert "f(x<<)>> and" in active  # the truly active token
    [wrong] = [t for t in active if t != "f(x<<)>> and"]  # the active decoy: one inactive token marked instead
    assert wrong.count("<<") == 1 and "<<)>>" not in wrong
    [standard] = [t for t in shown if t not in active]
    assert standard.count("<<") == 1  # as many random tokens as the correct window has active ones
    assert by_kind["standard"]["settings"]["n_negative"] == 1 and by_kind["active"]["settings"]["n_negative"] == 1


def test_fuzzing_standard_decoys_need_non_activating_windows():
    by_kind, _ = _fuzz(RuleStubBackend(), non_activating=[])
    assert by_kind["standard"]["score"] is None and by_kind["standard"]["null_reason"] == NO_NEGATIVES
    assert by_kind["active"]["score"] == 1.0


# --- embedding ---------------------------------------------------------------------------------------------
class KeywordEmbedder:
    """Unit vectors: [1, 0] for texts with a ')' or naming parentheses, else [0, 1]."""
    name = "keyword"

    def embed(self, texts):
        return np.array([[1.0, 0.0] if (")" in t or "parenthes" in t) else [0.0, 1.0] for t in texts])


def test_embedding_auc_from_cosine_similarity():
    cols = asyncio.run(embedding_columns(KeywordEmbedder(), "closing parentheses", PAREN, QUIET))
    assert cols["score"] == 1.0 and cols["settings"]["embedder"] == "keyword"
    assert (cols["settings"]["n_positive"], cols["settings"]["n_negative"]) == (3, 3)
    assert asyncio.run(embedding_columns(KeywordEmbedder(), "closing parentheses", PAREN, []))["null_reason"] \
        == NO_NEGATIVES


def test_real_minilm_embedding_prefers_windows_that_match_the_explanation():
    from workers.method.embedding import MiniLMEmbedder
    years = [_rec(i, [t], [1.0]) for i, t in enumerate(
        ["In 1998 the population was 1,204 and by 2003 it had reached 3,551.",
         "Revenue grew 12% in 2019, 15% in 2020 and 31% in 2021.",
         "The treaty was signed in 1648, ending a war that began in 1618."])]
    quiet = [_rec(10 + i, [t], [0.0], "random") for i, t in enumerate(
        ["The cat curled up on the warm windowsill and fell asleep.",
         "She opened the door slowly and looked into the dark hallway.",
         "Fresh bread smells wonderful when it comes out of the oven."])]
    cols = asyncio.run(embedding_columns(MiniLMEmbedder(), "years and numbers written with digits", years, quiet))
    assert cols["score"] == 1.0
    json.dumps(cols["settings"])


# --- the registry ------------------------------------------------------------------------------------------
def test_registry_lists_each_scorer_under_its_name_with_what_it_needs():
    assert list(SCORERS) == ["correlation", "detection", "fuzzing", "embedding"]
    assert all(cls.name == name for name, cls in SCORERS.items())
    needs = {name: (cls.needs_simulation, cls.needs_judge, cls.needs_embedder) for name, cls in SCORERS.items()}
    assert needs == {"correlation": (True, False, False), "detection": (False, True, False),
                     "fuzzing": (False, True, False), "embedding": (False, False, True)}


def test_unknown_scorer_names_are_one_line_naming_the_field_and_the_allowed_names():
    check_scorer_names(["fuzzing", "correlation"])
    with pytest.raises(ConfigError) as e:
        check_scorer_names(["correlation", "vibes", "astrology"])
    assert str(e.value) == ("scorers: 'vibes', 'astrology' are not scorers "
                            "(allowed: correlation, detection, fuzzing, embedding)")


# --- the example scorer of CONTRIBUTING.md ---------------------------------------------------------------
CONTRIBUTING = Path(__file__).resolve().parents[2] / "CONTRIBUTING.md"


def _contributing_blocks(marker: str) -> str:
    [block] = [b for b in re.findall(r"```python\n(.*?)```", CONTRIBUTING.read_text(), re.DOTALL) if marker in b]
    return block


def _hand_made_neuron() -> NeuronRecords:
    """Four top records (one per split, docs/method.md §2) and three random ones that stay at or below 0."""
    top = [_rec(1, [" my", " cats", " nap"], [0.0, 3.0, 0.0]), _rec(2, [" cats", " purr"], [2.0, 0.0]),
           _rec(3, [" two", " kittens", " play"], [0.0, 2.5, 0.0]), _rec(4, [" cats", "!"], [1.0, 0.0])]
    random = [_rec(10, [" the", " dog", " ran"], [0.0, -0.2, 0.0], "random"),
              _rec(11, [" a", " bird", " sang"], [-0.1, 0.0, 0.0], "random"),
              _rec(12, [" cats", " sleep"], [-0.5, 0.0], "random")]
    return NeuronRecords(layer=2, neuron=7, top=top, random=random)


def test_the_contributing_example_scorer_works_as_written(monkeypatch):
    module = types.ModuleType("keyword_example")
    exec(compile(_contributing_blocks("class KeywordScorer(Scorer)"), str(CONTRIBUTING), "exec"), module.__dict__)
    registry_line = _contributing_blocks("SCORERS: dict")
    namespace = {**vars(scorers_pkg), "KeywordScorer": module.KeywordScorer}
    exec(registry_line, namespace)
    assert namespace["SCORERS"] == {**SCORERS, "keyword": module.KeywordScorer}  # the shown line is the real one
    monkeypatch.setitem(SCORERS, "keyword", module.KeywordScorer)

    cfg = SweepConfig.from_dict({"records": {"top_k": 4, "n_random": 3, "n_per_split": 1},
                                 "scorers": ["keyword"]})
    check_config(cfg)
    simulator = ScriptedBackend([])
    res = asyncio.run(explain_and_score(_hand_made_neuron(), ScriptedBackend(["cats and kittens"]), simulator, cfg))
    assert res.error is None and res.explanation == "cats and kittens"
    [row] = res.score_rows
    # words {cats, kittens}; the valid split's top record (seq 3) has "kittens": 1 hit. The quiet windows
    # 10, 11, 12 have 0, 0, 1 hits: the positive beats two negatives and ties one, AUC = (1 + 1 + 0.5) / 3.
    assert row["score"] == pytest.approx(2.5 / 3) and row["null_reason"] is None
    assert (row["layer"], row["neuron"], row["candidate"], row["scorer"]) == (2, 7, 0, "keyword")
    assert row["seq_ids"] == [3, 10, 11, 12] and json.loads(row["settings"]) == {"min_word_length": 4}
    assert simulator.requests == []  # it needs no simulation
    to_table("scores", res.score_rows)


# --- NaN and infinite activations ----------------------------------------------------------------------
def test_non_activating_windows_need_every_activation_at_or_below_zero():
    nan = float("nan")
    recs = [_rec(1, ["a", "b"], [nan, -1.0], "random"), _rec(2, ["a", "b"], [-1.0, nan], "random"),
            _rec(3, ["a", "b"], [-1.0, float("-inf")], "random")]
    assert [r.seq_id for r in non_activating(recs)] == [3]  # max() of [-1, nan] is -1: that let window 2 in


def test_every_scorer_is_null_with_a_reason_for_non_finite_activations():
    neuron = _hand_made_neuron()
    neuron.top[0].activations = [0.0, float("inf"), 0.0]  # train: used to crash the explainer's normalization
    neuron.top[2].activations = [0.0, float("nan"), 0.0]  # valid top: read by every scorer
    cfg = SweepConfig.from_dict({"records": {"top_k": 4, "n_random": 3, "n_per_split": 1},
                                 "scorers": ["correlation", "detection", "fuzzing", "embedding"]})
    res = asyncio.run(explain_and_score(neuron, RuleStubBackend(), RuleStubBackend(), cfg,
                                        embedder=KeywordEmbedder()))
    assert res.error is None and res.explanation is not None
    rows = {row["scorer"]: row for row in res.score_rows}
    assert rows["correlation"]["score"] is None and rows["correlation"]["score_top"] is None
    assert rows["correlation"]["null_reason"].startswith(
        "score: non_finite_activations (1 of 6 true activations are NaN or infinite)")
    for name in ("detection", "fuzzing", "embedding"):
        assert rows[name]["score"] is None
        assert rows[name]["null_reason"] == "non_finite_activations (NaN or infinite activations in window 3)"
    to_table("scores", res.score_rows)
