import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.store import RunStore
from schemas.layout import PARTITIONED
from schemas.tables import TABLES, VERSION_KEY, SchemaVersionError, to_table


def test_every_published_file_carries_its_schema_version_and_table_name(tmp_path):
    """Read back from the Parquet file the run store wrote, keys and values spelled out: a reader of another
    version (or another tool) sees exactly these bytes."""
    assert set(TABLES) == {"sequences", "records", "neuron_stats", "explanations", "scores", "ledger", "calls"}
    store = RunStore.open(str(tmp_path / "run"), create=True)
    for name in TABLES:
        rel = store.write_table(name, to_table(name, []), "t", layer=0 if name in PARTITIONED else None)
        meta = pq.read_schema(store.path(rel)).metadata
        assert meta[b"neuronsweep.schema_version"] == b"1.4", name
        assert meta[b"neuronsweep.table"] == name.encode(), name
        assert store.read_table_file(rel, name).num_rows == 0  # and the store's own reader accepts it


def test_a_newer_minor_version_reads_and_a_file_without_one_is_refused(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    t = to_table("calls", [])
    store.write_bytes("minor.parquet", _parquet(t.replace_schema_metadata({VERSION_KEY: b"1.9"})))
    assert store.read_table_file("minor.parquet", "calls").num_rows == 0
    store.write_bytes("bare.parquet", _parquet(t.replace_schema_metadata({})))
    with pytest.raises(SchemaVersionError, match="bare.parquet: no neuronsweep schema version in its metadata"):
        store.read_table_file("bare.parquet", "calls")


def _parquet(table: pa.Table) -> bytes:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink)
    return sink.getvalue().to_pybytes()


def test_round_trip_through_the_run_store(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    rows = [{"layer": 3, "neuron": n, "status": "done", "attempts": 1, "shard_id": "L3-0000",
             "updated_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)} for n in range(5)]
    store.write_table("ledger", to_table("ledger", rows), "shard-L3-0000", layer=3)
    store.write_table("ledger", to_table("ledger", rows[:2]), "shard-L3-0000", layer=3)  # a retry overwrites
    store.write_json("_markers/L3-0000.json", {"shard_id": "L3-0000", "layer": 3})  # committed: readers see it
    t = store.read_table("ledger")
    assert t.num_rows == 2
    assert t.column("layer").type == pa.int16() and set(t.column("layer").to_pylist()) == {3}
    assert not [p for p in store.list_files("ledger") if "_tmp" in p]


def test_reader_refuses_unknown_major_version(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    t = to_table("ledger", [{"layer": 0, "neuron": 1, "status": "done"}]).drop_columns(["layer"])
    meta = dict(t.schema.metadata)
    meta[VERSION_KEY] = b"2.0"
    (tmp_path / "run/ledger/layer=0").mkdir(parents=True)
    pq.write_table(t.replace_schema_metadata(meta), tmp_path / "run/ledger/layer=0/shard-x.parquet")
    store.write_json("_markers/x.json", {"shard_id": "x", "layer": 0})  # committed: readers open it
    with pytest.raises(SchemaVersionError, match="schema version 2.0, this neuronsweep reads 1.x"):
        store.read_table("ledger")


def test_empty_table_reads_as_empty():
    import tempfile
    store = RunStore.open(tempfile.mkdtemp())
    assert store.read_table("scores").num_rows == 0
