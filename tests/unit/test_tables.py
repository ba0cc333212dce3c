import datetime as dt

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from orchestrator.store import RunStore
from schemas.tables import SCHEMA_VERSION, TABLES, VERSION_KEY, SchemaVersionError, check_version, to_table


def test_every_design_table_has_a_versioned_schema():
    assert set(TABLES) == {"sequences", "records", "neuron_stats", "explanations", "scores", "ledger", "calls"}
    for name, schema in TABLES.items():
        assert schema.metadata[VERSION_KEY] == SCHEMA_VERSION.encode()
        check_version(schema, name)


def test_round_trip_through_the_run_store(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    rows = [{"layer": 3, "neuron": n, "status": "done", "attempts": 1, "shard_id": "L3-0000",
             "updated_at": dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)} for n in range(5)]
    store.write_table("ledger", to_table("ledger", rows), "shard-L3-0000", layer=3)
    store.write_table("ledger", to_table("ledger", rows[:2]), "shard-L3-0000", layer=3)  # a retry overwrites
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
    pq.write_table(t.replace_schema_metadata(meta), tmp_path / "run/ledger/layer=0/x.parquet")
    with pytest.raises(SchemaVersionError, match="schema version 2.0, this neuronsweep reads 1.x"):
        store.read_table("ledger")


def test_empty_table_reads_as_empty():
    import tempfile
    store = RunStore.open(tempfile.mkdtemp())
    assert store.read_table("scores").num_rows == 0
