"""Every reader of a run sees only committed shards: `status`, `show`, the viewer, `report`, both exports and the
store's own `read_table`, after a crash just before a shard's marker and after a crash in the middle of a
`--retry-failed` re-commit (the previous commit stays whole until the new marker replaces it)."""
import asyncio
import json

import pytest

from orchestrator.cli.app import main
from orchestrator.plan import Shard
from orchestrator.results.interchange.bundle import bundle_table
from orchestrator.results.interchange.openai_export import export_openai
from orchestrator.results.report import write_report
from orchestrator.shards import ShardRunner
from schemas.layout import shard_marker
from support.runfactory import make_run
from testing.instant import InstantProcessor, SyntheticRecordSource

SECOND = Shard(0, (4, 5, 6, 7))  # make_run's layer 0, neurons 4-7: 4 and 7 done, 5 failed, 6 skipped


@pytest.fixture
def run(tmp_path):
    # shards L000-000000-000003 (all done) and L000-000004-000007, both committed
    return make_run(tmp_path / "run", layers=(0,), n_neurons=8, shard_size=4)


def status(path, capsys) -> dict:
    capsys.readouterr()
    assert main(["status", str(path), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def show(path, neuron, capsys) -> str:
    capsys.readouterr()
    assert main(["show", str(path), "0", str(neuron)]) == 0
    return capsys.readouterr().out


def viewer(path):
    from fastapi.testclient import TestClient

    from orchestrator.results.viewer.app import create_app
    return TestClient(create_app(str(path), refresh_s=0))


def test_a_shard_that_crashed_before_its_marker_is_seen_by_no_reader(run, tmp_path, capsys):
    root = tmp_path / "run"
    (root / shard_marker(SECOND.shard_id)).unlink()  # its files are all published: the crash came just before

    st = status(root, capsys)
    assert (st["done"], st["failed"], st["skipped"], st["pending"], st["shards_committed"]) == (4, 0, 0, 4, 1)
    assert "not processed yet" in show(root, 7, capsys) and "explanation" not in show(root, 7, capsys)
    assert sorted(run.store.read_table("ledger").column("neuron").to_pylist()) == [0, 1, 2, 3]
    assert sorted(bundle_table(run.store).column("neuron").to_pylist()) == [0, 1, 2, 3]
    exported = export_openai(run.store, tmp_path / "openai")
    assert (exported.neurons, exported.explanations) == (8, 4)  # every neuron's records; shard 0's explanations
    summary = write_report(run.store, tmp_path / "report")["summary"].read_text()
    assert "neurons done: **4** of 8 planned (failed 0, skipped 0, pending 4)" in summary
    client = viewer(root)
    assert client.get("/api/run").json()["progress"]["done"] == 4
    assert client.get("/api/neuron/0/7").json()["explanations"] == []


@pytest.mark.parametrize("crash_at", ["ledger", "marker"])
def test_a_retry_that_crashed_mid_commit_leaves_the_previous_commit_whole(run, tmp_path, capsys, monkeypatch,
                                                                          crash_at):
    """The re-commit publishes explanations, scores and ledger, then its marker; it crashes before the ledger
    (the new explanation and score of the failed neuron 5 are on disk) or before the marker (all of it is)."""
    root, store, cfg = tmp_path / "run", run.store, run.config
    # a marker as a sweep wrote it before markers listed their files: it commits the first-commit names
    store.write_json(shard_marker(SECOND.shard_id), {"shard_id": SECOND.shard_id, "layer": 0, "n": 4, "done": 2,
                                                     "failed": 1, "skipped": 1, "failures": {"malformed": 1}})
    runner = ShardRunner(cfg, store, InstantProcessor(cfg), SyntheticRecordSource(cfg))
    write_table, write_json = store.write_table, store.write_json

    def crashing_table(table, *a, **kw):
        if table == crash_at:
            raise OSError("killed")
        return write_table(table, *a, **kw)

    def crashing_json(rel, obj):
        if rel.startswith("_markers") and crash_at == "marker":
            raise OSError("killed")
        write_json(rel, obj)
    monkeypatch.setattr(store, "write_table", crashing_table)
    monkeypatch.setattr(store, "write_json", crashing_json)
    with pytest.raises(OSError, match="killed"):
        asyncio.run(runner.run(SECOND, retry_failed=True))
    monkeypatch.undo()

    st = status(root, capsys)
    assert (st["done"], st["failed"], st["skipped"]) == (6, 1, 1)
    text = show(root, 5, capsys)
    assert "failed" in text and "explanation" not in text and "correlation" not in text
    row = next(r for r in bundle_table(store).to_pylist() if r["neuron"] == 5)
    assert row["status"] == "failed" and row["explanation"] is None and row["score"] is None
    export_openai(store, tmp_path / "openai")
    assert not (tmp_path / "openai" / "explanations" / "0" / "5.jsonl").exists()
    assert "| malformed | 1 |" in write_report(store, tmp_path / "report")["summary"].read_text()
    d = viewer(root).get("/api/neuron/0/5").json()
    assert d["ledger"]["status"] == "failed" and d["explanations"] == [] and d["scores"] == []
    assert [r["neuron"] for r in store.read_table("explanations").to_pylist()].count(5) == 0

    # the retry runs again to the end: its leftovers are overwritten, the new commit replaces the old whole
    asyncio.run(runner.run(SECOND, retry_failed=True))
    st = status(root, capsys)
    assert (st["done"], st["failed"], st["skipped"], st["shards_committed"]) == (7, 0, 1, 2)
    ledger = sorted((r["neuron"], r["attempts"], r["status"]) for r in store.read_table("ledger").to_pylist()
                    if r["neuron"] == 5)
    assert ledger == [(5, 3, "failed"), (5, 4, "done")]
    explained = [r["explanation"] for r in store.read_table("explanations").to_pylist() if r["neuron"] == 5]
    assert explained == ["the word 'cat'"]
    assert "the word 'cat'" in show(root, 5, capsys)
