"""Interchange: OpenAI's neuron-explainer layout out and back in, a hand-written published-style file, and the
per-neuron bundle."""
from __future__ import annotations

import json
import math

import pyarrow.parquet as pq
import pytest

import orchestrator.cli.view  # noqa: F401  (registers the commands on the CLI app)
from orchestrator.cli.app import main
from orchestrator.plan import model_shape
from orchestrator.results.interchange.bundle import export_bundle
from orchestrator.results.interchange.openai_export import export_openai
from orchestrator.results.interchange.openai_import import import_openai, valid_kinds
from orchestrator.results.reader import RunReader
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from support.runfactory import make_run

# the fields of OpenAI's dataclasses (neuron_explainer/activations/activations.py, explanations/explanations.py)
NEURON_RECORD = {"dataclass_name", "neuron_id", "random_sample", "random_sample_by_quantile", "quantile_boundaries",
                 "mean", "variance", "skewness", "kurtosis", "most_positive_activation_records"}
SIMULATION_RESULTS = {"dataclass_name", "neuron_id", "scored_explanations"}
SCORED_SIMULATION = {"dataclass_name", "scored_sequence_simulations", "ev_correlation_score", "rsquared_score",
                     "absolute_dev_explained_score"}
SCORED_SEQUENCE = {"dataclass_name", "simulation", "true_activations", "ev_correlation_score", "rsquared_score",
                   "absolute_dev_explained_score"}
SEQUENCE_SIMULATION = {"dataclass_name", "tokens", "expected_activations", "activation_scale", "distribution_values",
                       "distribution_probabilities", "uncalibrated_simulation"}


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("interchange") / "run")


@pytest.fixture(scope="module")
def exported(facts, tmp_path_factory):
    out = tmp_path_factory.mktemp("openai")
    summary = export_openai(facts.store, out)
    return out, summary


def test_export_writes_openais_layout_and_field_names(exported, facts):
    out, summary = exported
    assert summary.neurons == 24 and summary.explanations == len(facts.done)
    rec = json.loads((out / "collated-activations" / "1" / "2.json").read_text())
    assert set(rec) == NEURON_RECORD and rec["dataclass_name"] == "NeuronRecord"
    assert rec["neuron_id"] == {"dataclass_name": "NeuronId", "layer_index": 1, "neuron_index": 2}
    assert len(rec["most_positive_activation_records"]) == 8 and len(rec["random_sample"]) == 6
    assert set(rec["random_sample"][0]) == {"dataclass_name", "tokens", "activations"}
    layer, neuron = sorted(facts.done)[0]
    lines = (out / "explanations" / str(layer) / f"{neuron}.jsonl").read_text().splitlines()
    doc = json.loads(lines[0])
    assert len(lines) == 1 and set(doc) == SIMULATION_RESULTS
    first = doc["scored_explanations"][0]
    assert set(first["scored_simulation"]) == SCORED_SIMULATION
    seq = first["scored_simulation"]["scored_sequence_simulations"][0]
    assert set(seq) == SCORED_SEQUENCE and set(seq["simulation"]) == SEQUENCE_SIMULATION
    assert not (out / "explanations" / "1" / "5.jsonl").exists()  # failed neurons have no explanation


def test_export_then_import_round_trips_records_and_scores(exported, facts, tmp_path):
    out, _ = exported
    back = RunStore.open(str(tmp_path / "back"), create=True)
    summary = import_openai(out, back)
    assert (summary.neurons, summary.layers, summary.windows) == (24, [0, 1, 2], 40)

    def records(store):
        seqs = {r["seq_id"]: r["tokens"] for r in store.read_table("sequences").to_pylist()}
        return {(r["layer"], r["neuron"], r["kind"], r["rank"]): (seqs[r["seq_id"]], r["activations"],
                                                                  r["max_activation"])
                for r in store.read_table("records").to_pylist()}
    assert records(back) == records(facts.store)

    stats = {(r["layer"], r["neuron"]): r for r in back.read_table("neuron_stats").to_pylist()}
    for r in facts.store.read_table("neuron_stats").to_pylist():
        s = stats[(r["layer"], r["neuron"])]
        assert (s["mean"], s["variance"], s["max"]) == (r["mean"], r["variance"], r["max"])

    def scores(store):
        seqs = {r["seq_id"]: tuple(r["tokens"]) for r in store.read_table("sequences").to_pylist()}
        return {(r["layer"], r["neuron"]): {**r, "windows": [seqs[s] for s in r["seq_ids"]]}
                for r in store.read_table("scores").to_pylist()}
    mine, theirs = scores(facts.store), scores(back)
    assert mine.keys() == theirs.keys() and len(mine) == len(facts.done)
    for key, a in mine.items():
        b = theirs[key]
        for col in ("score", "r2", "absdev", "per_sequence", "simulated", "windows"):
            assert b[col] == a[col], (key, col)
        for col in ("score_top", "score_random"):  # recomputed from the float32 values that were stored
            assert b[col] == pytest.approx(a[col], abs=1e-6), (key, col)
    index_a = {(r["layer"], r["neuron"]): r["explanation"] for r in RunReader(facts.store).index().to_pylist()}
    index_b = RunReader(back).index().to_pylist()
    assert len(index_b) == len(facts.done) and all(index_a[(r["layer"], r["neuron"])] == r["explanation"]
                                                   for r in index_b)
    marker = back.read_json("_extract/complete.json")
    assert marker["model"] == {"name": "imported", "architecture": "unknown", "n_layers": 3, "n_neurons": 8}
    assert (marker["top_k"], marker["n_random"], marker["seq_len"], marker["n_windows"]) == (8, 6, 12, 40)
    shape = model_shape(SweepConfig.from_dict({"output": str(tmp_path / "back")}), back)
    assert (shape["name"], shape["n_layers"], shape["n_neurons"]) == ("imported", 3, 8)


def _record(tokens, acts):
    return {"tokens": tokens, "activations": acts}


def test_import_a_published_style_file_with_nan_stats_and_no_class_names(tmp_path):
    src = tmp_path / "gpt2xl"
    (src / "collated-activations" / "5").mkdir(parents=True)
    (src / "explanations" / "5").mkdir(parents=True)
    top = [_record([" a", f" t{i}"], [float(10 - i), 0.0]) for i in range(8)]
    rnd = [_record([" r", f" x{i}"], [0.0, 0.1 * i]) for i in range(6)]
    (src / "collated-activations" / "5" / "17.json").write_text(
        '{"neuron_id": {"layer_index": 5, "neuron_index": 17}, "most_positive_activation_records": '
        + json.dumps(top) + ', "random_sample": ' + json.dumps(rnd)
        + ', "random_sample_by_quantile": [[' + json.dumps(top[0]) + "]], \"mean\": 0.25, \"variance\": NaN, "
        '"skewness": NaN, "kurtosis": NaN}')
    valid = [top[2], top[6], rnd[1], rnd[4]]  # docs/method.md §2 / OpenAI dealing with n = 2
    sims = [[9.0, 1.0], [8.0, 0.0], [0.0, 1.0], [1.0, 2.0]]
    seqs = [{"simulation": {"tokens": r["tokens"], "expected_activations": s}, "true_activations": r["activations"],
             "ev_correlation_score": 1.0} for r, s in zip(valid, sims)]
    (src / "explanations" / "5" / "17.jsonl").write_text(json.dumps({"neuron_id": {}, "scored_explanations": [
        {"explanation": " tokens after a", "scored_simulation": {"scored_sequence_simulations": seqs,
                                                                 "ev_correlation_score": 0.875}},
        {"explanation": " second", "scored_simulation": {"scored_sequence_simulations": []}}]}) + "\n")
    run = RunStore.open(str(tmp_path / "run"), create=True)
    s = import_openai(src, run, n_layers=48, n_neurons=6400)
    assert (s.neurons, s.explanations, s.scores, s.windows) == (1, 1, 1, 14)
    kinds = sorted((r["kind"], r["rank"]) for r in run.read_table("records").to_pylist())
    assert kinds == sorted([("top", i) for i in range(8)] + [("random", i) for i in range(6)] + [("quantile", 0)])
    stats = run.read_table("neuron_stats").to_pylist()[0]
    assert (stats["mean"], stats["variance"], stats["max"]) == (0.25, None, 10.0)
    score = run.read_table("scores").to_pylist()[0]
    assert score["score"] == 0.875 and score["simulated"] == sims
    # top part: true [8, 0, 4, 0] vs simulated [9, 1, 8, 0]: deviations [5, -3, 1, -3] and [4.5, -3.5, 3.5, -4.5]
    assert score["score_top"] == pytest.approx(50 / math.sqrt(44 * 65))
    # random part: true [0, .1, 0, .4] vs [0, 1, 1, 2]: deviations [-.125, -.025, -.125, .275] and [-1, 0, 0, 1]
    assert score["score_random"] == pytest.approx(0.4 / math.sqrt(0.1075 * 2))
    expl = sorted(run.read_table("explanations").to_pylist(), key=lambda r: r["candidate"])
    assert [(e["explanation"], e["selected"]) for e in expl] == [(" tokens after a", True), (" second", False)]
    assert run.read_json("_extract/complete.json")["model"]["n_layers"] == 48


def test_valid_kinds_deal_the_split_like_the_method():
    top, rnd = list(range(8)), list(range(100, 106))
    assert valid_kinds(top, rnd, [2, 6, 101, 104]) == ["top", "top", "random", "random"]
    # a window that is both a top and a random record is told apart by its place in the split
    assert valid_kinds([0, 1, 2, 3, 4, 5, 6, 7], [9, 6, 8, 10, 11, 12], [2, 6, 6, 11]) == \
        ["top", "top", "random", "random"]
    assert valid_kinds(top, [], [2, 6]) == ["top", "top"]
    assert valid_kinds(top, rnd, [7, 105, 999]) == ["top", "random", None]  # not a dealt split: by membership


def test_bundle_has_one_row_per_neuron_with_its_records(facts, tmp_path):
    n = export_bundle(facts.store, tmp_path / "b.parquet")
    t = pq.read_table(tmp_path / "b.parquet")
    assert n == t.num_rows == 24
    row = next(r for r in t.to_pylist() if (r["layer"], r["neuron"]) == sorted(facts.done)[0])
    assert row["model"] == "tiny-test" and row["status"] == "done" and row["explanation"].startswith("the word")
    assert len(row["top_tokens"]) == 8 and len(row["top_activations"][0]) == len(row["top_tokens"][0]) == 12
    export_bundle(facts.store, tmp_path / "b.jsonl")
    lines = [json.loads(x) for x in (tmp_path / "b.jsonl").read_text().splitlines()]
    assert len(lines) == 24 and all(not (isinstance(v, float) and math.isnan(v)) for r in lines for v in r.values())


def test_cli_export_import_and_refusals(facts, tmp_path, capsys):
    assert main(["export", facts.store.root, str(tmp_path / "oa")]) == 0
    assert main(["import", str(tmp_path / "oa"), "--out", str(tmp_path / "run")]) == 0
    assert "imported 24 neurons" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "oa"), "--out", str(tmp_path / "run")]) == 2  # not into a used run
    assert main(["export", facts.store.root, str(tmp_path / "x"), "--format", "csv"]) == 2
    assert main(["export", str(tmp_path / "nothing"), str(tmp_path / "y")]) == 2
    assert main(["export", facts.store.root, str(tmp_path / "b.jsonl"), "--format", "bundle"]) == 0
