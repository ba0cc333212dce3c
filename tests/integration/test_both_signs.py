"""Both signs of a neuron (docs/method.md §1 "Both signs") through the real parts: records stored as extraction
stores them and loaded by the store's record source, the ShardRunner running the real method against the rule
stub through LLM clients with the call journal, the commit, then every reader: the index, one neuron's detail,
`show`, the viewer, the report and the exports. Schema 1.3 tables, without `polarity`, read as positive."""
from __future__ import annotations

import asyncio
import json

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from orchestrator.cli.app import main
from orchestrator.plan import EXTRACT_MARKER, IMPORTED, RUN_FILE, Shard
from orchestrator.results.index import query_index
from orchestrator.results.interchange.bundle import bundle_table
from orchestrator.results.interchange.neuronpedia import export_neuronpedia
from orchestrator.results.interchange.openai_export import export_openai
from orchestrator.results.reader import RunReader
from orchestrator.results.report import summary_markdown
from orchestrator.shards import ShardRunner, StoreRecordSource, record_call
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.layout import records_file, shard_marker
from schemas.tables import VERSION_KEY, to_table
from support.two_sided import two_sided_neuron
from testing.stubs import RULES, RuleStubBackend, pydoc_windows
from workers.llm.client import LLMClient
from workers.llm.journal import CallJournal
from workers.method.neuron import explain_and_score
from workers.method.prompts import EXPLAINER_SYSTEM

DIGITS, COMMAS, THE = "digits and numbers written with digits", "commas", 'the word "the"'
# neuron -> (its positive rule, its negative peak): the positive peak is 4.0, so neuron 0's negative side (on
# commas) passes the rule and neuron 1's does not
NEURONS = {0: ("digits", 4.0), 1: ("the", 1.0)}
SHARD = Shard(0, (0, 1))


class RecordingStub(RuleStubBackend):
    """The rule stub, keeping every explainer prompt it answered."""

    def __init__(self, model: str):
        super().__init__(model=model)
        self.explainer_prompts: list[str] = []

    def answer(self, messages):
        if messages[0]["content"] == EXPLAINER_SYSTEM:
            self.explainer_prompts.append(messages[-1]["content"])
        return super().answer(messages)


def _write_run(root) -> tuple[SweepConfig, RunStore, dict]:
    """A run directory as an import leaves it (records, sequences, extraction marker) plus run.json."""
    cfg = SweepConfig.from_dict({"output": str(root), "layers": "0", "neurons": "0-1", "shard_size": 2})
    store = RunStore.open(str(root), create=True)
    windows = pydoc_windows(max_windows=400)
    store.write_table("sequences", to_table("sequences", [
        {"seq_id": i, "token_ids": list(range(len(w))), "tokens": w} for i, w in enumerate(windows)]), "part-00000")
    neurons = {n: two_sided_neuron(rule, "comma", windows, neuron=n, negative_peak=peak, seed=n)
               for n, (rule, peak) in NEURONS.items()}
    rows = [{"layer": 0, "neuron": n, "kind": kind, "rank": r.rank, "seq_id": r.seq_id, "activations": r.activations,
             "max_activation": max(r.activations)}
            for n, recs in neurons.items() for kind in ("top", "bottom", "random") for r in getattr(recs, kind)]
    store.write_table("records", to_table("records", rows), records_file(0, 2), 0)
    store.write_json(EXTRACT_MARKER, {"model": {"name": IMPORTED, "n_layers": 1, "n_neurons": 2}, "layers": [0],
                                      "n_neurons": 2})
    store.write_json(RUN_FILE, {"config": cfg.model_dump(mode="json"),
                                "model": {"name": IMPORTED, "n_layers": 1, "n_neurons": 2},
                                "plan": {"n_neurons": 2, "n_shards": 1, "shard_size": 2}})
    return cfg, store, neurons


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("both-signs") / "run"
    cfg, store, neurons = _write_run(root)
    journal = CallJournal(root.parent / "calls.sqlite")
    explainer_stub, simulator_stub = RecordingStub("explainer-stub"), RuleStubBackend(model="simulator-stub")
    explainer = LLMClient(explainer_stub, role="explainer", journal=journal, on_call=record_call)
    simulator = LLMClient(simulator_stub, role="simulator", journal=journal, on_call=record_call)

    async def process(records):
        return await explain_and_score(records, explainer, simulator, cfg)

    runner = ShardRunner(cfg, store, process, StoreRecordSource(store), journal=journal)
    summary = asyncio.run(runner.run(SHARD))
    return {"store": store, "summary": summary, "neurons": neurons, "prompts": explainer_stub.explainer_prompts}


def test_both_sides_are_committed_with_their_polarity_and_a_weak_negative_side_is_not(run):
    store, s = run["store"], run["summary"]
    assert (s.done, s.failed) == (2, 0)
    expl = {(r["neuron"], r["polarity"]): r["explanation"] for r in store.read_table("explanations").to_pylist()}
    assert expl == {(0, "positive"): DIGITS, (0, "negative"): COMMAS, (1, "positive"): THE}
    scores = {(r["neuron"], r["polarity"]): r for r in store.read_table("scores").to_pylist()}
    assert sorted(scores) == sorted(expl)
    assert scores[(0, "positive")]["score"] > 0.7 and scores[(0, "negative")]["score"] > 0.7
    bottom = run["neurons"][0].bottom
    valid = [r.seq_id for r in bottom[2:20:4]] + [r.seq_id for r in run["neurons"][0].random[1:15:3]]
    assert scores[(0, "negative")]["seq_ids"] == valid  # scored on the stored bottom windows, loaded from the run


def test_each_side_has_its_own_explainer_prompt_and_journal_key_and_both_are_paid_for(run):
    store, s = run["store"], run["summary"]
    digit, comma = RULES["digits"].match, RULES["comma"].match
    shown = [[line.rsplit("\t", 1) for line in p.split("\n") if line.count("\t") == 1] for p in run["prompts"]]
    high = [{t for t, v in pairs if v.strip() == "10"} for pairs in shown]
    # three explainer calls: neuron 0's two sides and neuron 1's positive side; one of them saw commas at 10
    # (the bottom windows, negated) and no digit above 0
    negative = [i for i, h in enumerate(high) if any(comma(t) for t in h)]
    assert len(run["prompts"]) == 3 and len(negative) == 1
    assert all(v.strip() == "0" for t, v in shown[negative[0]] if digit(t))
    calls = store.read_table("calls").to_pylist()
    explainer_keys = {c["key"] for c in calls if c["model"] == "explainer-stub"}
    assert len(explainer_keys) == 3  # the sides' requests differ, so their journal keys do
    assert ("explainer", "stub", "explainer-stub", "ok", 3) in s.requests
    ledger = {r["neuron"]: r for r in store.read_table("ledger").to_pylist()}
    assert ledger[0]["prompt_tokens"] > 1.5 * ledger[1]["prompt_tokens"]  # neuron 0's row pays for both sides


def test_the_index_and_the_detail_keep_the_sides_apart(run):
    reader = RunReader(run["store"], refresh_s=0)
    index = {r["neuron"]: r for r in reader.index().to_pylist()}
    assert (index[0]["explanation"], index[0]["negative_explanation"]) == (DIGITS, COMMAS)
    assert index[0]["score"] > 0.7 and index[0]["negative_score"] > 0.7
    assert index[1]["negative_explanation"] is None and index[1]["negative_score"] is None
    d = reader.neuron(0, 0)
    assert [e["explanation"] for e in d["explanations"]] == [DIGITS]
    assert [e["explanation"] for e in d["negative"]["explanations"]] == [COMMAS]
    scored = d["negative"]["scored"]["correlation"]
    stored = {r.seq_id: r.activations for r in run["neurons"][0].bottom + run["neurons"][0].random}
    assert all(r["true"] == pytest.approx([-x for x in stored[r["seq_id"]]]) for r in scored)  # negated
    assert {r["kind"] for r in scored} == {"bottom", "random"}
    assert reader.neuron(0, 1)["negative"] is None
    page, total = query_index(reader.index(), text="commas")
    assert page["neuron"].to_pylist() == [0] and total == 1  # a search reads the explanations of both sides


def test_show_names_both_sides(run, capsys):
    assert main(["show", run["store"].root, "0", "0"]) == 0
    out = capsys.readouterr().out
    assert "positive side" in out and "negative side" in out
    assert out.index("positive side") < out.index(DIGITS) < out.index("negative side") < out.index(COMMAS)
    assert "bottom #0" in out
    assert main(["show", run["store"].root, "0", "1"]) == 0
    out = capsys.readouterr().out
    assert THE in out and "negative side" not in out


def test_the_viewer_shows_the_negative_side_in_its_own_section(run):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from orchestrator.results.viewer import create_app
    client = TestClient(create_app(run["store"].root, refresh_s=0))
    html = client.get("/neuron/0/0").text
    section = html[html.index('<section id="negative">'):]
    assert COMMAS in section and 'data-polarity="negative"' in section and DIGITS not in section.split("</section>")[0]
    assert 'id="scored-negative-correlation"' in html and 'id="records-bottom"' in html
    assert '<section id="negative">' not in client.get("/neuron/0/1").text
    assert "negative side: commas" in client.get("/").text
    api = client.get("/api/neuron/0/0").json()
    assert api["negative"]["explanations"][0]["explanation"] == COMMAS


def test_the_report_gives_the_negative_sides_apart(run):
    reader = RunReader(run["store"], refresh_s=0)
    text = summary_markdown(reader.index(), reader.progress(), run="r", headline="correlation")
    assert "neurons with a defined correlation score: 2" in text  # the positive sides only
    assert "negative sides explained: **1** neurons (0 failed)" in text


def test_the_exports_keep_the_positive_side_where_their_layout_has_one(run, tmp_path):
    export_openai(run["store"], tmp_path / "openai")
    doc = json.loads((tmp_path / "openai" / "explanations" / "0" / "0.jsonl").read_text())
    assert [e["explanation"] for e in doc["scored_explanations"]] == [DIGITS]
    bundle = {r["neuron"]: r for r in bundle_table(run["store"]).to_pylist()}
    assert (bundle[0]["explanation"], bundle[0]["negative_explanation"]) == (DIGITS, COMMAS)
    assert len(bundle[0]["bottom_activations"]) == 20
    summary = export_neuronpedia(run["store"], tmp_path / "np")
    assert summary.explanations == 2 and summary.activations == 2 * (20 + 15)  # top and random records only


def test_tables_from_before_the_polarity_column_read_as_the_positive_side(run, tmp_path):
    """Schema 1.3 files: the shard's explanations and scores rewritten without `polarity`."""
    import shutil

    root = tmp_path / "old"
    shutil.copytree(run["store"].root, root)
    store = RunStore.open(str(root))
    marker = store.read_json(shard_marker(SHARD.shard_id))
    for table in ("explanations", "scores"):
        [rel] = marker["files"][table]
        t = pq.read_table(root / rel)
        t = t.filter(pc.equal(t["polarity"], "positive")).drop_columns(["polarity"])
        pq.write_table(t.replace_schema_metadata({**t.schema.metadata, VERSION_KEY: b"1.3"}), root / rel)
    reader = RunReader(store, refresh_s=0)
    index = {r["neuron"]: r for r in reader.index().to_pylist()}
    assert index[0]["explanation"] == DIGITS and index[0]["score"] > 0.7 and index[0]["negative_explanation"] is None
    d = reader.neuron(0, 0)
    assert [(e["explanation"], e["polarity"]) for e in d["explanations"]] == [(DIGITS, "positive")]
    assert d["negative"] is None and d["scored"]["correlation"]
