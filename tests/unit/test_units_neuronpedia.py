"""Neuronpedia's upload layout: the files and field names its importer reads, and a round trip through it."""
from __future__ import annotations

import gzip
import json

import pytest

import orchestrator.cli.view  # noqa: F401  (registers the commands on the CLI app)
from orchestrator.cli.app import main
from orchestrator.results.interchange.neuronpedia import export_neuronpedia, import_neuronpedia, model_id_of
from orchestrator.results.reader import RunReader
from orchestrator.store import RunStore
from support.runfactory import make_run

# columns of Neuronpedia's tables (apps/webapp/prisma/schema.prisma) that its export writes
ACTIVATION = {"id", "modelId", "layer", "index", "creatorId", "dataSource", "tokens", "maxValue", "minValue",
              "values", "maxValueTokenIndex", "dfaValues", "dfaMaxValue", "dfaTargetIndex", "binContains",
              "binMin", "binMax"}
EXPLANATION = {"id", "modelId", "layer", "index", "authorId", "description", "typeName", "explanationModelName"}
FEATURE = {"modelId", "layer", "index", "maxActApprox", "creatorId", "frac_nonzero", "sourceSetName", "hookName",
           "hasVector", "vector", "vectorLabel"}


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("np") / "run")


@pytest.fixture(scope="module")
def exported(facts, tmp_path_factory):
    out = tmp_path_factory.mktemp("neuronpedia")
    return out, export_neuronpedia(facts.store, out)


def _rows(path):
    return [json.loads(line) for line in gzip.decompress(path.read_bytes()).decode().splitlines()]


def test_export_writes_neuronpedias_files_and_fields(exported, facts):
    out, s = exported
    assert s.sources == ["0-mlp-neuronsweep", "1-mlp-neuronsweep", "2-mlp-neuronsweep"]
    assert (s.features, s.explanations) == (24, len(facts.done))
    base = out / "tiny-test" / "1-mlp-neuronsweep"
    for name in ("model", "release", "sourceset", "source"):
        assert (base / f"{name}.jsonl").is_file()
    model = json.loads((base / "model.jsonl").read_text())
    assert (model["id"], model["layers"], model["neuronsPerLayer"]) == ("tiny-test", 3, 8)
    source = json.loads((base / "source.jsonl").read_text())
    assert (source["id"], source["modelId"], source["setName"]) == ("1-mlp-neuronsweep", "tiny-test",
                                                                    "mlp-neuronsweep")
    acts = _rows(base / "activations" / "batch-0.jsonl.gz")
    assert set(acts[0]) >= ACTIVATION and acts[0]["layer"] == "1-mlp-neuronsweep" and acts[0]["index"] == "0"
    a = acts[0]
    assert a["maxValue"] == max(a["values"]) and a["values"][a["maxValueTokenIndex"]] == a["maxValue"]
    assert len(a["tokens"]) == len(a["values"]) == 12
    feats = _rows(base / "features" / "batch-0.jsonl.gz")
    assert [f["index"] for f in feats] == [str(i) for i in range(8)] and set(feats[0]) >= FEATURE
    expl = _rows(base / "explanations" / "batch-0.jsonl.gz") if (base / "explanations").exists() else []
    assert all(set(e) >= EXPLANATION and e["typeName"] == "oai_token-act-pair" for e in expl)


def test_round_trip_keeps_records_stats_and_explanations(exported, facts, tmp_path):
    out, _ = exported
    back = RunStore.open(str(tmp_path / "back"), create=True)
    s = import_neuronpedia(out, back)
    assert (s.layers, s.features, s.windows) == ([0, 1, 2], 24, 40)

    def records(store):
        seqs = {r["seq_id"]: r["tokens"] for r in store.read_table("sequences").to_pylist()}
        return {(r["layer"], r["neuron"], r["kind"], r["rank"]): (seqs[r["seq_id"]], r["activations"])
                for r in store.read_table("records").to_pylist()}
    assert records(back) == records(facts.store)
    stats = {(r["layer"], r["neuron"]): (r["max"], r["frac_positive"]) for r in
             back.read_table("neuron_stats").to_pylist()}
    assert stats == {(r["layer"], r["neuron"]): (r["max"], r["frac_positive"])
                     for r in facts.store.read_table("neuron_stats").to_pylist()}
    mine = {(r["layer"], r["neuron"]): r["explanation"] for r in RunReader(facts.store).index().to_pylist()
            if r["explanation"]}
    theirs = {(r["layer"], r["neuron"]): r["explanation"] for r in RunReader(back).index().to_pylist()}
    assert theirs == mine and len(mine) == len(facts.done)
    marker = back.read_json("_extract/complete.json")
    assert (marker["model"]["n_layers"], marker["n_neurons"], marker["top_k"], marker["n_random"]) == (3, 8, 8, 6)


def test_foreign_activations_become_top_records_by_max(tmp_path):
    folder = tmp_path / "gpt2-small" / "6-res-jb" / "activations"
    folder.mkdir(parents=True)
    rows = [{"modelId": "gpt2-small", "layer": "6-res-jb", "index": "7", "id": f"cl{i}", "tokens": ["a", f"b{i}"],
             "values": [0.0, float(v)], "maxValue": float(v)} for i, v in enumerate([1.0, 3.0, 2.0])]
    (folder / "batch-0.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = RunStore.open(str(tmp_path / "run"), create=True)
    s = import_neuronpedia(tmp_path / "gpt2-small", run)
    assert s.layers == [6]
    recs = sorted(run.read_table("records").to_pylist(), key=lambda r: r["rank"])
    assert [(r["kind"], r["rank"], r["max_activation"]) for r in recs] == [("top", 0, 3.0), ("top", 1, 2.0),
                                                                           ("top", 2, 1.0)]


def test_model_ids_are_neuronpedia_safe():
    assert model_id_of("HuggingFaceTB/SmolLM2-135M") == "huggingfacetb-smollm2-135m"


def test_cli_round_trip(facts, tmp_path, capsys):
    assert main(["export", facts.store.root, str(tmp_path / "np"), "--format", "neuronpedia"]) == 0
    assert main(["import", str(tmp_path / "np"), "--out", str(tmp_path / "run"), "--format", "neuronpedia"]) == 0
    assert "imported 24 units" in capsys.readouterr().out
    assert main(["import", str(tmp_path / "empty"), "--out", str(tmp_path / "r2"), "--format", "neuronpedia"]) == 2
