"""`import_openai` validates every file of an OpenAI-layout folder first: each malformed file is reported with its
path and reason, in one error, and nothing is written to the run directory."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

import orchestrator.cli.view  # noqa: F401  (registers the commands on the CLI app)
from orchestrator.cli.app import main
from orchestrator.results.interchange.openai_import import import_openai
from orchestrator.store import RunStore


def _record(tokens, acts):
    return {"tokens": tokens, "activations": acts}


def _neuron(layer: int, neuron: int) -> dict:
    return {"dataclass_name": "NeuronRecord", "neuron_id": {"layer_index": layer, "neuron_index": neuron},
            "most_positive_activation_records": [_record([" a", f" t{i}"], [float(4 - i), 0.0]) for i in range(4)],
            "random_sample": [_record([" r", f" x{i}"], [0.0, 0.1 * i]) for i in range(2)],
            "random_sample_by_quantile": None, "mean": 0.25, "variance": 1.0}


def _good_folder(tmp_path: Path) -> Path:
    """Layers 0 and 1, two neurons each, and an explanation for (0, 2): all valid."""
    src = tmp_path / "oa"
    for layer in (0, 1):
        (src / "collated-activations" / str(layer)).mkdir(parents=True)
        for neuron in (2, 3):
            (src / "collated-activations" / str(layer) / f"{neuron}.json").write_text(
                json.dumps(_neuron(layer, neuron)))
    (src / "explanations" / "0").mkdir(parents=True)
    (src / "explanations" / "0" / "2.jsonl").write_text(json.dumps({"scored_explanations": [
        {"explanation": " a", "scored_simulation": {"ev_correlation_score": 0.5, "scored_sequence_simulations": [
            {"simulation": {"tokens": [" a", " t0"], "expected_activations": [1.0, 0.0]},
             "true_activations": [4.0, 0.0], "ev_correlation_score": 1.0}]}}]}) + "\n")
    return src


def _bad_file(src: Path) -> Path:
    """The file the tests break: layer 1 (so layer 0, which is valid, would be written first by a lax importer)."""
    return src / "collated-activations" / "1" / "3.json"


def _assert_nothing_written(run_root: Path) -> None:
    written = [p for p in run_root.rglob("*") if p.is_file()] if run_root.exists() else []
    assert written == [], f"the run directory received {written}"


def _import_fails(tmp_path: Path, src: Path, *expected: str) -> str:
    run_root = tmp_path / "run"
    with pytest.raises(ValueError) as e:
        import_openai(src, RunStore.open(str(run_root), create=True))
    msg = str(e.value)
    for text in expected:
        assert text in msg, msg
    _assert_nothing_written(run_root)
    return msg


def _break(tmp_path: Path, mutate) -> tuple[Path, Path]:
    src = _good_folder(tmp_path)
    path = _bad_file(src)
    doc = json.loads(path.read_text())
    path.write_text(mutate(doc) if callable(mutate) else mutate)
    return src, path


def test_a_good_folder_still_imports(tmp_path):
    src = _good_folder(tmp_path)
    run = RunStore.open(str(tmp_path / "run"), create=True)
    s = import_openai(src, run)
    assert (s.neurons, s.layers, s.explanations, s.scores) == (4, [0, 1], 1, 1)
    assert len(run.read_table("records").to_pylist()) == 4 * 6


def test_null_activation(tmp_path):
    def mutate(doc):
        doc["most_positive_activation_records"][1]["activations"][0] = None
        return json.dumps(doc)
    src, path = _break(tmp_path, mutate)
    _import_fails(tmp_path, src, f"{path}: most_positive_activation_records.1.activations.0",
                  "valid number")


def test_missing_key(tmp_path):
    def mutate(doc):
        del doc["random_sample"][0]["tokens"]
        return json.dumps(doc)
    src, path = _break(tmp_path, mutate)
    _import_fails(tmp_path, src, f"{path}: random_sample.0.tokens: Field required")


def test_top_level_list(tmp_path):
    src, path = _break(tmp_path, lambda doc: json.dumps([doc]))
    _import_fails(tmp_path, src, f"{path}: expected a JSON object at the top level, got list")


def test_numbers_as_tokens(tmp_path):
    def mutate(doc):
        doc["most_positive_activation_records"][0]["tokens"] = [101, 102]
        return json.dumps(doc)
    src, path = _break(tmp_path, mutate)
    _import_fails(tmp_path, src, f"{path}: most_positive_activation_records.0.tokens.0", "valid string")


def test_activations_shorter_than_tokens(tmp_path):
    def mutate(doc):
        doc["most_positive_activation_records"][2]["activations"] = [1.0]
        return json.dumps(doc)
    src, path = _break(tmp_path, mutate)
    _import_fails(tmp_path, src, f"{path}: most_positive_activation_records.2", "1 activations for 2 tokens")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity"])
def test_non_finite_activation_literals(tmp_path, literal):
    def mutate(doc):
        doc["most_positive_activation_records"][0]["activations"][1] = "@@"
        return json.dumps(doc).replace('"@@"', literal)
    src, path = _break(tmp_path, mutate)
    assert literal in path.read_text()
    reason = "finite number" if literal == "NaN" else f"non-finite number literal {literal}"
    _import_fails(tmp_path, src, f"{path}:", reason)


def test_stray_orig_file_beside_a_record(tmp_path):
    src = _good_folder(tmp_path)
    path = _bad_file(src)
    stray = path.with_name("3.json.orig")
    stray.write_text(path.read_text())
    _import_fails(tmp_path, src, f"{stray}: unexpected file")


def test_every_bad_file_is_reported_at_once_and_the_cli_prints_them(tmp_path, capsys):
    src = _good_folder(tmp_path)
    a = src / "collated-activations" / "0" / "2.json"
    b = _bad_file(src)
    a.write_text("[]")
    b.write_text("{not json")
    msg = _import_fails(tmp_path, src, "2 invalid file(s), nothing imported", f"{a}: expected a JSON object",
                        f"{b}: invalid JSON")
    assert len(msg.splitlines()) == 3
    assert main(["import", str(src), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr()
    text = " ".join((err.out + err.err).split())
    assert "2 invalid file(s)" in text and "3.json: invalid JSON" in text and "2.json: expected a JSON object" in text
    _assert_nothing_written(tmp_path / "run2")


def test_bad_explanation_file_imports_nothing(tmp_path):
    src = _good_folder(tmp_path)
    path = src / "explanations" / "0" / "2.jsonl"
    doc = json.loads(path.read_text())
    doc["scored_explanations"][0]["scored_simulation"]["scored_sequence_simulations"][0]["simulation"][
        "expected_activations"] = [1.0]
    path.write_text(json.dumps(doc) + "\n")
    _import_fails(tmp_path, src, f"{path}:", "1 expected_activations for 2 tokens")
