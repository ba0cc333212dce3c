"""A hand-edited or damaged run directory: each problem is one line on stderr (exit 2) naming the file and what to
do, never a traceback, and a refused resume writes nothing (no duplicate rows, no lease left behind)."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from orchestrator.cli.app import main
from orchestrator.plan import IMPORTED, prepare_run
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.layout import (
    EXTRACT_MARKER,
    LEASE_FILE,
    LEASE_GUARD,
    RUN_FILE,
    records_file,
    sequences_part,
    shard_file_name,
    shard_marker,
    table_file,
)
from schemas.tables import to_table
from support.runfactory import make_run


def extracted_run(path) -> RunStore:
    """A run directory as an import leaves it and a first sweep plans it: 2 layers x 8 neurons of records (files
    named as extraction names them), 4 windows of tokens, run.json for shards of 4; nothing committed yet."""
    store = RunStore.open(str(path), create=True)
    store.write_table("sequences", to_table("sequences", [
        {"seq_id": s, "token_ids": [1, 2], "tokens": [" a", " b"]} for s in range(4)]), sequences_part(0))
    for layer in (0, 1):
        store.write_table("records", to_table("records", [
            {"layer": layer, "neuron": n, "kind": "top", "rank": 0, "seq_id": n % 4, "activations": [0.0, 1.0],
             "max_activation": 1.0} for n in range(8)]), records_file(0, 8), layer)
    store.write_json(EXTRACT_MARKER, {"model": {"name": IMPORTED, "architecture": "unknown", "n_layers": 2,
                                                "n_neurons": 8}, "layers": [0, 1], "n_neurons": 8, "n_windows": 4})
    prepare_run(config(path), store)
    return store


def config(path, **kw) -> SweepConfig:
    return SweepConfig.from_dict({"output": str(path), "neurons": "0-7", "shard_size": 4, "metrics_port": 0, **kw})


def error_line(capsys, args) -> str:
    """The one line `neuronsweep ARGS` prints on stderr, after checking it exits 2 with no traceback."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def files_of(root) -> dict[str, bytes]:
    """Every file's bytes but the lease's guard (an empty file locked while a lease changes hands; it stays)."""
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, fs in os.walk(root) for f in fs if f != LEASE_GUARD}


@pytest.mark.parametrize("content, what", [("{}", "it holds no config"), ("[1, 2]", "not a JSON object"),
                                           (None, "not valid JSON")])
def test_an_empty_or_truncated_run_json_is_one_line_naming_it(tmp_path, capsys, content, what):
    store = extracted_run(tmp_path / "run")
    path = tmp_path / "run" / RUN_FILE
    text = path.read_text()
    path.write_text(content if content is not None else text[:len(text) // 2])
    for command in ("resume", "status"):
        line = error_line(capsys, [command, str(tmp_path / "run")])
        assert line.startswith(f"error: {path} is damaged ({what}")
        assert line.endswith("restore it from a copy of the run, or start again in a new --out directory")
    assert not store.exists(LEASE_FILE)


def test_a_shard_size_edited_in_run_json_is_refused_before_any_work(tmp_path, capsys):
    """Shards of 8 over a run cut into shards of 4: every neuron would be done again under new shard ids (duplicate
    rows) and `done` would pass `planned` and never complete."""
    store = extracted_run(tmp_path / "run")
    store.write_json(shard_marker("L000-000000-000003"), {"shard_id": "L000-000000-000003", "layer": 0, "n": 4,
                                                          "done": 4})
    path = tmp_path / "run" / RUN_FILE
    doc = json.loads(path.read_text())
    doc["config"]["shard_size"] = 8
    path.write_text(json.dumps(doc))
    line = error_line(capsys, ["resume", str(tmp_path / "run")])
    assert line == (f"error: {path}: config.shard_size is 8, but the run's shards were cut with 4 (plan.shard_size); "
                    f"set config.shard_size back to 4 (a different size needs a new --out directory)")
    # edited in both places: the committed shards give it away
    doc["plan"]["shard_size"] = 8
    path.write_text(json.dumps(doc))
    before = files_of(tmp_path / "run")
    line = error_line(capsys, ["resume", str(tmp_path / "run")])
    marker = tmp_path / "run" / shard_marker("L000-000000-000003")
    assert line.startswith(f"error: {marker}: committed shard L000-000000-000003 is not one of this run's shards "
                           f"(1 of 1 committed shards are not): the layers, neurons or shard_size in run.json differ")
    assert files_of(tmp_path / "run") == before  # nothing written, no lease left
    assert error_line(capsys, ["status", str(tmp_path / "run")]) == line  # rather than done > planned


def test_missing_sequences_are_named_before_any_work(tmp_path, capsys):
    extracted_run(tmp_path / "run")
    shutil.rmtree(tmp_path / "run" / "sequences")
    line = error_line(capsys, ["resume", str(tmp_path / "run")])
    assert line == (f"error: {tmp_path / 'run' / 'sequences'} is missing or empty, but {EXTRACT_MARKER} says the "
                    f"extraction stored 4 windows there (the records' tokens); restore it from a copy of the run, "
                    f"or extract again into a new --out directory")


@pytest.mark.parametrize("name", ["notes.txt", "n000000-000008 (copy).parquet"])
def test_a_stray_file_among_the_records_is_named(tmp_path, capsys, name):
    extracted_run(tmp_path / "run")
    stray = tmp_path / "run" / "records" / "layer=0" / name
    stray.write_bytes(b"not records")
    line = error_line(capsys, ["resume", str(tmp_path / "run")])
    assert line == (f"error: {stray} is not a records file of this run (they are named nAAAAAA-BBBBBB.parquet); "
                    f"move it out of the run directory")
    stray.unlink()
    # the records of a planned layer gone altogether
    shutil.rmtree(tmp_path / "run" / "records" / "layer=1")
    line = error_line(capsys, ["resume", str(tmp_path / "run")])
    assert line.startswith(f"error: {tmp_path / 'run' / 'records' / 'layer=1'} holds no records, but "
                           f"{EXTRACT_MARKER} says layer 1 was extracted")


def test_a_truncated_ledger_file_names_the_shard_marker_to_delete(tmp_path, capsys):
    facts = make_run(tmp_path / "run")
    shard_id = "L000-000000-000003"
    rel = table_file("ledger", shard_file_name(shard_id), 0)
    path = tmp_path / "run" / rel
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    for args in (["status", facts.store.root], ["show", facts.store.root, "0", "1"]):
        line = error_line(capsys, args)
        assert line.startswith(f"error: {path} is damaged (")
        assert line.endswith(f"delete {shard_marker(shard_id)} and resume the run: the shard is done again")


def test_a_truncated_shard_marker_is_named(tmp_path, capsys):
    facts = make_run(tmp_path / "run")
    marker = tmp_path / "run" / shard_marker("L001-000004-000007")
    marker.write_text(marker.read_text()[:5])
    line = error_line(capsys, ["status", facts.store.root])
    assert line.startswith(f"error: {marker} is damaged (not valid JSON: ")
    assert line.endswith("delete it and resume the run: the shard is done again")
