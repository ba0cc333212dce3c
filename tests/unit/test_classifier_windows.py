"""The classifier windows of detection, fuzzing and embedding (docs/method.md §2, §6): extraction's stratified and
non-activating picks (the sketch against its slow reference, and a planted neuron whose non-activating windows
are all positive but small), and the scorers' protocol over them, end to end through `explain_and_score`."""
import asyncio
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.config import ConfigError, SweepConfig
from schemas.tables import to_table
from testing.stubs import RuleStubBackend
from workers.extract.sketch import (
    BAND_TOPS,
    N_BANDS,
    QuantileSketch,
    band_first_bucket,
    bucket_of_py,
    classifier_picks_py,
    low_cut,
)
from workers.method.explainer import explainer_records
from workers.method.neuron import explain_and_score
from workers.method.records import ActivationRecord, NeuronRecords
from workers.method.scorers._common import spread
from workers.method.scorers.base import classifier_windows
from workers.method.scoring import f1_score, split_records

SEED = 1234


# --- the cut between non-activating and activating windows -------------------------------------------------
def test_band_edges_and_the_cut_by_hand():
    """Bands are half octaves of the sketch's buckets: tops 2**-8, 1.5 * 2**-8, 2**-7, ... 0.75, 1.0, 1.5, ..."""
    assert BAND_TOPS[0] == 2 ** -8 and BAND_TOPS[1] == 1.5 * 2 ** -8 and BAND_TOPS[2] == 2 ** -7
    assert BAND_TOPS[15] == 0.75 and BAND_TOPS[16] == 1.0 and BAND_TOPS[17] == 1.5
    assert BAND_TOPS[N_BANDS - 1] == float("inf") and BAND_TOPS[N_BANDS - 2] == 65536.0
    # max 10, below 0.1: the cut is 1.0 (17 bands below it), the first activating bucket is 1.0's
    k = low_cut(torch.tensor([10.0, 9.99, 0.0, -3.0, float("nan"), 1e-3]), 0.1).tolist()
    assert k == [17, 16, 0, 0, 0, 0]
    assert band_first_bucket(17) == bucket_of_py(1.0) and band_first_bucket(16) == bucket_of_py(0.75)


# --- the sketch's picks against the slow reference ---------------------------------------------------------
def feed(sketch, maxima, seq_ids, batch, clean):
    for i in range(0, len(seq_ids), batch):
        sketch.update(maxima[i:i + batch], seq_ids[i:i + batch], clean[i:i + batch])


@settings(max_examples=40, deadline=None)
@given(n_windows=st.integers(0, 250), n_neurons=st.integers(1, 3), bins=st.integers(1, 5),
       per_bin=st.integers(1, 3), spare=st.integers(0, 1), n_low=st.integers(0, 4), parts=st.integers(1, 3),
       batch=st.integers(1, 40), below=st.sampled_from([0.05, 0.3, 0.9]), scale=st.sampled_from([1e-2, 1.0, 1e3]),
       seed=st.integers(0, 10 ** 6))
def test_classifier_picks_equal_the_slow_reference_whatever_the_slices(n_windows, n_neurons, bins, per_bin, spare,
                                                                       n_low, parts, batch, below, scale, seed):
    """Merged over slices of the corpus fed in any batches, the sketch picks what the slow reference picks from
    every window's maximum; a window holding a non-finite activation is never picked."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randperm(10 * n_windows + 1, generator=g)[:n_windows]
    maxima = (torch.randn(n_windows, n_neurons, generator=g) * scale).round(decimals=1)  # ties across windows
    clean = torch.rand(n_windows, n_neurons, generator=g) > 0.1
    neuron_max = torch.where(clean, maxima, float("-inf")).amax(0) if n_windows else torch.full((n_neurons,), -1.0)
    cuts = sorted({0, n_windows, *torch.randint(0, n_windows + 1, (parts - 1,), generator=g).tolist()})
    merged = QuantileSketch(n_neurons, per_bin + spare, seed, 3, "cpu", n_low=n_low)
    for lo, hi in zip(cuts, cuts[1:]):
        part = QuantileSketch(n_neurons, per_bin + spare, seed, 3, "cpu", n_low=n_low)
        feed(part, maxima[lo:hi], seq[lo:hi], batch, clean[lo:hi])
        merged.merge(part)
    got = merged.classifier_picks(neuron_max, bins, per_bin, below)
    assert got.shape == (n_neurons, bins * per_bin + n_low)
    for n in range(n_neurons):
        keep = clean[:, n]
        want = classifier_picks_py(seed, 3, n, seq[keep].tolist(), maxima[keep, n].tolist(),
                                   float(neuron_max[n]), bins, per_bin, n_low, below)
        assert [(c, s) for c, s in enumerate(got[n].tolist()) if s >= 0] == want


def test_a_planted_neuron_whose_non_activating_windows_are_all_positive_but_small():
    """200 windows with maxima in [0.02, 0.08], all above 0, and 400 with maxima spread over [1, 10]. Below 0.1 x
    the max (10) the cut is 1.0: the 50 non-activating picks are quiet windows (none of which a "max <= 0" rule
    would find), the 10 x 3 stratified picks are activating ones, bin by bin from low to high maxima."""
    quiet = torch.linspace(0.02, 0.08, 200)
    active = torch.linspace(1.0, 10.0, 400)
    maxima = torch.cat([quiet, active])[:, None]
    seq = torch.randperm(600, generator=torch.Generator().manual_seed(5))
    by_seq = dict(zip(seq.tolist(), maxima[:, 0].tolist()))
    sketch = QuantileSketch(1, 3, SEED, 0, "cpu", n_low=50)
    feed(sketch, maxima, seq, 64, torch.ones(600, 1, dtype=torch.bool))
    picks = sketch.classifier_picks(torch.tensor([10.0]), 10, 3, 0.1)[0].tolist()
    strat, low = picks[:30], picks[30:]
    assert len(low) == 50 and all(0.02 <= by_seq[s] <= 0.08 for s in low) and len(set(low)) == 50
    assert all(s >= 0 and by_seq[s] >= 1.0 for s in strat) and len(set(strat)) == 30
    bin_means = [sum(by_seq[s] for s in strat[3 * b:3 * b + 3]) / 3 for b in range(10)]
    assert bin_means == sorted(bin_means)
    # deciles of [1, 10]: bin b holds maxima near 1 + 0.9 b .. 1.9 + 0.9 b (up to one bucket, 6.25 %, at its edges)
    for b in range(10):
        assert all(0.93 * (1 + 0.9 * b) <= by_seq[s] <= 1.07 * (1.9 + 0.9 * b) for s in strat[3 * b:3 * b + 3]), b


def test_too_few_non_activating_windows_give_what_the_corpus_has():
    maxima = torch.tensor([[0.01], [0.02], [5.0], [6.0], [7.0]])
    sketch = QuantileSketch(1, 1, SEED, 0, "cpu", n_low=4)
    feed(sketch, maxima, torch.arange(5), 5, torch.ones(5, 1, dtype=torch.bool))
    picks = sketch.classifier_picks(torch.tensor([7.0]), 1, 1, 0.1)[0].tolist()
    assert sorted(picks[1:3]) == [0, 1] and picks[3:] == [-1, -1] and picks[0] in (2, 3, 4)


# --- the scorers' windows ----------------------------------------------------------------------------------
def rec(seq_id, tokens, acts, kind, rank=0):
    return ActivationRecord(seq_id, tokens, acts, kind, rank)


PAREN = [" f", "(", "x", ")", " and"]
WORDS = [" the", " cat", " sat", " down"]


def planted_neuron(per_bin=2, bins=10, n_low=6) -> NeuronRecords:
    """A closing-parenthesis neuron: 20 top records, 15 random and `n_low` non-activating windows that all stay
    positive but small (0.05 at most, max 8), and `per_bin` stratified windows per bin, all with a ')'."""
    top = [rec(i, PAREN, [0, 0, 0, 8.0 - 0.1 * i, 0.5], "top", i) for i in range(20)]
    random = [rec(100 + i, WORDS, [0.01, 0.05, 0.02, 0.03], "random", i) for i in range(15)]
    strat = [rec(200 + r, PAREN, [0.2, 0, 0, 0.8 * (r // per_bin + 1), 0.1], "stratified", r)
             for r in range(bins * per_bin)]
    low = [rec(300 + i, WORDS, [0.04, 0.01, 0.02, 0.05], "non_activating", i) for i in range(n_low)]
    return NeuronRecords(3, 9, top=top, random=random, stratified=strat, non_activating=low)


def config(**classifier) -> SweepConfig:
    return SweepConfig.from_dict({"scorers": ["detection", "fuzzing", "embedding"],
                                  "classifier": {"per_bin": 2, "n_non_activating": 6, **classifier}})


class KeywordEmbedder:
    name = "keyword"

    def embed(self, texts):
        import numpy as np
        return np.array([[1.0, 0.0] if (")" in t or "parenthes" in t) else [0.0, 1.0] for t in texts])


def test_the_planted_neuron_scores_perfectly_and_every_row_records_its_protocol():
    neuron = planted_neuron()
    cfg = config()
    res = asyncio.run(explain_and_score(neuron, RuleStubBackend(), RuleStubBackend(), cfg, embedder=KeywordEmbedder()))
    assert res.error is None and res.explanation is not None and "closing parentheses" in res.explanation
    rows = {r["scorer"]: r for r in res.score_rows}
    assert list(rows) == ["detection", "fuzzing", "fuzzing_active", "embedding"]
    for name, row in rows.items():
        s = json.loads(row["settings"])
        assert row["score"] == 1.0 and row["null_reason"] is None, name
        assert (s["protocol"], s["bins"], s["per_bin"], s["non_activating_below"]) == ("stratified", 10, 2, 0.1)
        assert s["n_positive"] == 20 and s["n_negative"] == (20 if name == "fuzzing_active" else 6), name
    for name in ("detection", "fuzzing", "fuzzing_active"):
        assert rows[name]["f1"] == 1.0 and rows[name]["auc"] == pytest.approx(1.0)
    assert json.loads(rows["fuzzing"]["settings"])["decoys"] == "standard"
    assert rows["fuzzing"]["prompt_tokens"] > 0 and rows["fuzzing_active"].get("prompt_tokens") is None
    assert sorted(rows["detection"]["seq_ids"]) == list(range(200, 220)) + list(range(300, 306))
    to_table("scores", res.score_rows)


def test_the_top_protocol_takes_random_windows_below_the_fraction_of_the_max():
    """The random records stay positive (0.05 at most) below 0.1 x the max (8): all 15 count as non-activating,
    cut to n_non_activating; with a fraction of 0.005 none does."""
    neuron = planted_neuron()
    splits = split_records(neuron.top, neuron.random, 5)
    w = classifier_windows(neuron, splits, config(examples="top", n_non_activating=12))
    assert [r.seq_id for r in w.non_activating] == list(range(100, 112))
    assert [r.seq_id for r in w.activating] == [r.seq_id for r in splits["valid"] if r.kind == "top"]
    assert w.settings["protocol"] == "top" and "fallback" not in w.settings
    assert classifier_windows(neuron, splits, config(examples="top", non_activating_below=0.005)).non_activating == []


def test_records_without_classifier_windows_fall_back_to_the_top_protocol_and_say_so():
    neuron = planted_neuron()
    neuron.stratified, neuron.non_activating = [], []
    w = classifier_windows(neuron, split_records(neuron.top, neuron.random, 5), config())
    assert w.settings["protocol"] == "top" and w.settings["fallback"] == "the records hold no classifier windows"
    assert len(w.non_activating) == 6


def test_a_stratified_explainer_sees_one_window_per_bin_that_the_scorers_leave_out():
    neuron = planted_neuron(per_bin=3)  # extraction picks per_bin + 1 = 3 per bin with a stratified explainer
    cfg = SweepConfig.from_dict({"scorers": ["detection"], "explainer": {"examples": "stratified"},
                                 "classifier": {"per_bin": 2, "n_non_activating": 6}})
    splits = split_records(neuron.top, neuron.random, 5)
    shown = explainer_records(neuron, splits, cfg)
    assert [r.rank for r in shown] == [27, 24, 21, 18, 15, 12, 9, 6, 3, 0]  # the first of each bin, highest first
    w = classifier_windows(neuron, splits, cfg)
    assert len(w.activating) == 20 and not {r.seq_id for r in shown} & {r.seq_id for r in w.activating}
    assert w.settings["shown_to_explainer_left_out"] == 10
    res = asyncio.run(explain_and_score(neuron, RuleStubBackend(), RuleStubBackend(), cfg))
    assert res.error is None and res.score_rows[0]["score"] == 1.0


def test_a_stratified_explainer_needs_stratified_classifier_windows():
    with pytest.raises(ConfigError) as e:
        SweepConfig.from_dict({"explainer": {"examples": "stratified"}, "classifier": {"examples": "top"}})
    assert "\n" not in str(e.value) and "explainer.examples 'stratified'" in str(e.value)


@pytest.mark.parametrize("bad, named", [
    ({"per_bin": 0}, "classifier.per_bin"), ({"decoys": ["sneaky"]}, "classifier.decoys"),
    ({"decoys": []}, "classifier.decoys"), ({"non_activating_below": 1.5}, "classifier.non_activating_below"),
    ({"examples": "quantiles"}, "classifier.examples"), ({"batch": 3}, "classifier.batch")])
def test_bad_classifier_settings_are_one_line_naming_the_field(bad, named):
    with pytest.raises(ConfigError) as e:
        SweepConfig.from_dict({"classifier": bad})
    assert str(e.value).startswith(named) and "\n" not in str(e.value)


def test_classifier_defaults_follow_the_protocol():
    c = SweepConfig().classifier
    assert (c.examples, c.bins, c.per_bin, c.n_non_activating, c.non_activating_below, c.highlight, c.decoys,
            c.batch_size) == ("stratified", 10, 5, 50, 0.1, 0.4, ["standard", "active"], 5)


# --- metrics and batching ----------------------------------------------------------------------------------
def test_f1_by_hand():
    # labels 1 1 1 0 0, answers 1 0 1 1 0: TP 2, FP 1, FN 1 -> 4 / 6
    assert f1_score([1, 1, 1, 0, 0], [1, 0, 1, 1, 0]) == pytest.approx(4 / 6)
    assert f1_score([0, 0], [0, 0]) is None and f1_score([1, 0], [0, 1]) == 0.0


@settings(max_examples=60, deadline=None)
@given(keys=st.lists(st.integers(0, 6), max_size=40), size=st.integers(1, 6))
def test_spread_keeps_every_item_and_no_key_twice_in_a_batch(keys, size):
    items = list(enumerate(keys))
    batches = spread(items, size, key=lambda item: item[1])
    assert sorted(x for b in batches for x in b) == items
    assert all(0 < len(b) <= size and len({k for _, k in b}) == len(b) for b in batches)
