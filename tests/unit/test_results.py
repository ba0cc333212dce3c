"""Read-side helpers: the neuron index, paging/search, progress, one neuron's detail, and live re-reading."""
from __future__ import annotations

import datetime as dt
import shutil

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from orchestrator.results.index import build_index, query_index
from orchestrator.results.reader import RunReader, neuron_detail
from support.runfactory import make_run

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)


def _t(rows: list[dict], schema: dict) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=pa.schema(schema))


LEDGER = {"layer": pa.int16(), "neuron": pa.int32(), "status": pa.string(), "error": pa.string(),
          "updated_at": pa.timestamp("ms", tz="UTC"), "shard_id": pa.string(), "cost_usd": pa.float64(),
          "shard": pa.string()}
EXPL = {"layer": pa.int16(), "neuron": pa.int32(), "explanation": pa.string(), "candidate": pa.int16(),
        "selected": pa.bool_(), "explainer_model": pa.string(), "created_at": pa.timestamp("ms", tz="UTC"),
        "shard": pa.string()}
SCORES = {"layer": pa.int16(), "neuron": pa.int32(), "candidate": pa.int16(), "scorer": pa.string(),
          "score": pa.float64(), "score_top": pa.float64(), "score_random": pa.float64(), "r2": pa.float64(),
          "absdev": pa.float64(), "null_reason": pa.string(), "simulator_model": pa.string(),
          "simulator_mode": pa.string(), "shard": pa.string()}


def test_build_index_takes_the_latest_ledger_row_and_the_rows_of_its_shard():
    # neuron (0, 1) was imported, then swept again by shard S1; (0, 2) failed once, then succeeded
    ledger = _t([
        {"layer": 0, "neuron": 1, "status": "done", "updated_at": T0, "shard_id": "imported", "shard": "imported"},
        {"layer": 0, "neuron": 1, "status": "done", "updated_at": T0 + dt.timedelta(hours=1), "shard_id": "S1",
         "shard": "S1"},
        {"layer": 0, "neuron": 2, "status": "failed", "error": "X", "updated_at": T0, "shard_id": "S1", "shard": "S1"},
        {"layer": 0, "neuron": 2, "status": "done", "updated_at": T0 + dt.timedelta(hours=2), "shard_id": "S2",
         "shard": "S2"},
    ], LEDGER)
    expl = _t([
        {"layer": 0, "neuron": 1, "explanation": "old", "candidate": 0, "selected": True, "shard": "imported",
         "created_at": T0 + dt.timedelta(hours=5)},
        {"layer": 0, "neuron": 1, "explanation": "new", "candidate": 0, "selected": True, "shard": "S1",
         "created_at": T0},
        {"layer": 0, "neuron": 1, "explanation": "not chosen", "candidate": 1, "selected": False, "shard": "S1",
         "created_at": T0},
        {"layer": 0, "neuron": 2, "explanation": "two", "candidate": 0, "selected": True, "shard": "S2",
         "created_at": T0},
    ], EXPL)
    scores = _t([
        {"layer": 0, "neuron": 1, "candidate": 0, "scorer": "correlation", "score": 0.1, "shard": "imported"},
        {"layer": 0, "neuron": 1, "candidate": 0, "scorer": "correlation", "score": 0.7, "shard": "S1"},
        {"layer": 0, "neuron": 1, "candidate": 0, "scorer": "detection", "score": 0.9, "shard": "S1"},
        {"layer": 0, "neuron": 2, "candidate": 0, "scorer": "correlation", "score": None, "shard": "S2"},
    ], SCORES)
    idx = build_index(ledger, expl, scores).to_pylist()
    assert [(r["neuron"], r["status"], r["explanation"], r["score"], r["detection_score"]) for r in idx] == \
        [(1, "done", "new", 0.7, 0.9), (2, "done", "two", None, None)]


def test_build_index_keeps_each_side_in_its_own_columns():
    """docs/method.md §1 "Both signs": the negative side never stands in for, or mixes into, the positive one; a
    row with no polarity (schema < 1.4) is positive."""
    ledger = _t([{"layer": 0, "neuron": n, "status": "done", "updated_at": T0, "shard_id": "S", "shard": "S"}
                 for n in (1, 2)], LEDGER)
    expl = pa.Table.from_pylist([
        {"layer": 0, "neuron": 1, "explanation": "digits", "candidate": 0, "selected": True, "shard": "S",
         "created_at": T0, "polarity": None},
        {"layer": 0, "neuron": 1, "explanation": "commas", "candidate": 0, "selected": True, "shard": "S",
         "created_at": T0 + dt.timedelta(hours=1), "polarity": "negative"},
        {"layer": 0, "neuron": 2, "explanation": "cats", "candidate": 0, "selected": True, "shard": "S",
         "created_at": T0, "polarity": "positive"},
    ], schema=pa.schema({**EXPL, "polarity": pa.string()}))
    scores = pa.Table.from_pylist([
        {"layer": 0, "neuron": 1, "candidate": 0, "scorer": "correlation", "score": 0.7, "shard": "S",
         "polarity": "positive"},
        {"layer": 0, "neuron": 1, "candidate": 0, "scorer": "correlation", "score": 0.4, "shard": "S",
         "polarity": "negative"},
        {"layer": 0, "neuron": 1, "candidate": 0, "scorer": "detection", "score": 0.9, "shard": "S",
         "polarity": "positive"},
        {"layer": 0, "neuron": 1, "candidate": 0, "scorer": "detection", "score": 0.1, "shard": "S",
         "polarity": "negative"},
        {"layer": 0, "neuron": 2, "candidate": None, "scorer": "correlation", "score": None, "shard": "S",
         "polarity": "negative", "null_reason": "negative side failed (malformed): x"},
    ], schema=pa.schema({**SCORES, "polarity": pa.string()}))
    idx = build_index(ledger, expl, scores).to_pylist()
    got = [(r["neuron"], r["explanation"], r["score"], r["detection_score"], r["negative_explanation"],
            r["negative_score"], r["negative_null_reason"]) for r in idx]
    assert got == [(1, "digits", 0.7, 0.9, "commas", 0.4, None),
                   (2, "cats", None, None, None, None, "negative side failed (malformed): x")]
    index = build_index(ledger, expl, scores)
    for words, want in (("COMMAS", [1]), ("digits", [1]), ("cats", [2]), ("digits commas", [])):
        assert query_index(index, text=words)[0]["neuron"].to_pylist() == want, words  # words of one explanation


def _index(scores, layers=None, texts=None) -> pa.Table:
    n = len(scores)
    return pa.table({"layer": pa.array(layers or [i % 3 for i in range(n)], pa.int16()),
                     "neuron": pa.array(range(n), pa.int32()), "status": ["done"] * n,
                     "explanation": texts or [f"text {i}" for i in range(n)],
                     "score": pa.array(scores, pa.float64())})


def test_query_filters_sorts_and_pages():
    idx = _index([0.5, None, 0.9, -0.2, 0.9, 0.1], texts=["Python code", "code", "python CODE lists", "x", "y", "z"])
    page, total = query_index(idx, limit=3)
    assert total == 6 and page["neuron"].to_pylist() == [4, 2, 0]  # a tie goes to the lower layer (4 is in 1)
    page, _ = query_index(idx, offset=3, limit=3)
    assert page["neuron"].to_pylist() == [5, 3, 1]  # null last
    page, total = query_index(idx, text="code PYTHON")
    assert total == 2 and set(page["neuron"].to_pylist()) == {0, 2}
    page, total = query_index(idx, min_score=0.1, max_score=0.5)
    assert page["neuron"].to_pylist() == [0, 5]
    page, total = query_index(idx, layer=1, sort="score", descending=False)
    assert page["neuron"].to_pylist() == [4, 1]


@settings(max_examples=40, deadline=None)
@given(st.lists(st.one_of(st.none(), st.sampled_from([-0.5, 0.0, 0.3, 0.8, 1.0])), min_size=1, max_size=300),
       st.integers(0, 40), st.integers(1, 10), st.booleans())
def test_partial_sort_pages_equal_the_full_sort(scores, offset, limit, descending):
    idx = _index(scores)
    page, total = query_index(idx, offset=offset, limit=limit, descending=descending)
    keys = sorted(range(len(scores)), key=lambda i: (scores[i] is None, (-1 if descending else 1) *
                                                     (scores[i] or 0), i % 3, i))
    assert total == len(scores) and page["neuron"].to_pylist() == keys[offset:offset + limit]


@pytest.fixture(scope="module")
def facts(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("results") / "run")


def test_progress_counts_the_runs_neurons_tokens_and_cost(facts):
    p = RunReader(facts.store).progress()
    ledger = facts.store.read_table("ledger").to_pylist()
    assert (p.planned, p.done, p.failed, p.skipped, p.pending) == (24, len(facts.done), len(facts.failed),
                                                                  len(facts.skipped), 0)
    assert p.cost_usd == pytest.approx(sum(r["cost_usd"] or 0 for r in ledger))
    assert p.prompt_tokens == sum(r["prompt_tokens"] or 0 for r in ledger)
    assert p.scored == len(facts.done - facts.undefined)
    assert p.failures == {"malformed": 2, "rate_limited": 1}
    assert p.extracted and p.shards_committed == p.n_shards == 6


def test_neuron_detail_joins_tokens_and_true_activations(facts):
    layer, neuron = sorted(facts.done)[0]
    d = neuron_detail(facts.store, layer, neuron)
    seqs = {r["seq_id"]: r["tokens"] for r in facts.store.read_table("sequences").to_pylist()}
    recs = [r for r in facts.store.read_table("records").to_pylist() if (r["layer"], r["neuron"]) == (layer, neuron)]
    assert [r["rank"] for r in d["records"]["top"]] == list(range(8))
    for r in d["records"]["top"] + d["records"]["random"]:
        assert r["tokens"] == seqs[r["seq_id"]] and len(r["tokens"]) == len(r["activations"])
    by_seq = {r["seq_id"]: r["activations"] for r in recs}
    scored = d["scored"]["correlation"]
    assert [r["seq_id"] for r in scored] == d["scores"][0]["seq_ids"]
    assert all(r["true"] == by_seq[r["seq_id"]] and len(r["simulated"]) == len(r["tokens"]) for r in scored)
    assert d["explanations"][0]["selected"] and d["ledger"]["status"] == "done"


def test_reader_picks_up_shards_committed_while_it_runs(tmp_path):
    running = make_run(tmp_path / "running", commit_layers=(0,))
    finished = make_run(tmp_path / "finished")
    reader = RunReader(running.store, refresh_s=0)
    assert set(reader.index()["layer"].to_pylist()) == {0}
    version = reader.version
    for table in ("ledger", "explanations", "scores"):  # layer 1's shards publish their files...
        shutil.copytree(tmp_path / "finished" / table / "layer=1", tmp_path / "running" / table / "layer=1")
    assert set(reader.index()["layer"].to_pylist()) == {0} and reader.version == version  # ...not committed yet
    for marker in (tmp_path / "finished" / "_markers").glob("L001-*.json"):  # ...then their markers
        shutil.copy(marker, tmp_path / "running" / "_markers" / marker.name)
    idx = reader.index()
    assert set(idx["layer"].to_pylist()) == {0, 1} and reader.version == version + 1
    assert reader.index() is idx  # nothing changed: not rebuilt
    assert finished.store.read_table("ledger").num_rows == 24


def test_imported_rows_count_once_the_import_has_written_its_extraction_marker(tmp_path):
    """An import writes its tables, then the extraction marker (last): the rows are committed by that marker."""
    from orchestrator.store import RunStore
    from schemas.layout import EXTRACT_MARKER, shard_file_name
    from schemas.tables import to_table

    store = RunStore.open(str(tmp_path / "run"), create=True)
    store.write_table("ledger", to_table("ledger", [{"layer": 2, "neuron": 7, "status": "done", "shard_id": "imported",
                                                     "updated_at": T0}]), shard_file_name("imported"), 2)
    assert store.read_table("ledger").num_rows == 0 and RunReader(store).index().num_rows == 0
    store.write_json(EXTRACT_MARKER, {"model": {"name": "imported", "n_layers": 3, "n_neurons": 8}})
    assert store.read_table("ledger").column("neuron").to_pylist() == [7]
    assert RunReader(store).index()["neuron"].to_pylist() == [7]
