"""The run directory: a local path or an object-store URI (s3://, gs://) through pyarrow.fs.

Layout (every table partitioned by layer where it has one):
    run.json                                resolved config, plan, versions
    sequences/part-00000.parquet            corpus windows, stored once
    records/layer=L/<name>.parquet          per-neuron top / random / quantile records
    neuron_stats/layer=L/<name>.parquet
    explanations/layer=L/shard-<id>.parquet
    scores/layer=L/shard-<id>.parquet
    ledger/layer=L/shard-<id>.parquet
    calls/shard-<id>.parquet                the journal rows of the calls a committed shard made
    _markers/<id>.json                      written last: the shard is committed
    _extract/                               extraction checkpoints

A file is published atomically: written under a `_tmp` name and renamed on a local file system; on an
object store a single PUT is already atomic, so the object is written once under its final key. Readers
skip names starting with `_` or `.` (pyarrow's default), so partial state is never read.
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from schemas.tables import TABLES, check_version

LAYER_PARTITIONING = ds.partitioning(pa.schema([("layer", pa.int16())]), flavor="hive")
PARTITIONED = {"records", "neuron_stats", "explanations", "scores", "ledger"}


def open_fs(uri: str, *, s3_options: dict | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path within it) for a local path or URI. S3 options (endpoint, keys) come from the
    caller's edge (CLI/env), never from the config file, so secrets do not reach run.json."""
    if uri.startswith("s3://") and s3_options:
        fs = pafs.S3FileSystem(**s3_options)
        return fs, uri[len("s3://"):].rstrip("/")
    if "://" in uri:
        fs, path = pafs.FileSystem.from_uri(uri)
        return fs, path.rstrip("/")
    path = os.path.abspath(uri)
    return pafs.LocalFileSystem(), path


@dataclass
class RunStore:
    fs: pafs.FileSystem
    root: str

    @classmethod
    def open(cls, uri: str, *, s3_options: dict | None = None, create: bool = False) -> "RunStore":
        fs, root = open_fs(uri, s3_options=s3_options)
        if create:
            fs.create_dir(root, recursive=True)
        return cls(fs, root)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.get_file_info(self.path(*parts)).type != pafs.FileType.NotFound

    # --- small JSON documents --------------------------------------------------------------------------------
    def write_json(self, rel: str, obj) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, sort_keys=True, default=str).encode())

    def read_json(self, rel: str):
        with self.fs.open_input_stream(self.path(rel)) as f:
            return json.loads(f.read())

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{final.rsplit('/', 1)[0]}/_tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        else:
            with self.fs.open_output_stream(final) as f:
                f.write(data)

    # --- Parquet tables --------------------------------------------------------------------------------------
    def table_file(self, table: str, name: str, layer: int | None = None) -> str:
        if table in PARTITIONED:
            if layer is None:
                raise ValueError(f"table {table} is partitioned by layer; a layer is needed")
            return f"{table}/layer={layer}/{name}.parquet"
        return f"{table}/{name}.parquet"

    def write_table(self, table: str, data: pa.Table, name: str, layer: int | None = None) -> str:
        """Publish one Parquet file of `table` atomically under a deterministic name (a retry overwrites it)."""
        schema = TABLES[table]
        data = data.cast(schema) if data.schema != schema else data
        if table in PARTITIONED:
            data = data.drop_columns(["layer"])
        rel = self.table_file(table, name, layer)
        sink = pa.BufferOutputStream()
        pq.write_table(data.replace_schema_metadata(schema.metadata), sink, compression="zstd")
        self.write_bytes(rel, sink.getvalue().to_pybytes())
        return rel

    def dataset(self, table: str) -> ds.Dataset | None:
        base = self.path(table)
        if self.fs.get_file_info(base).type == pafs.FileType.NotFound:
            return None
        kw = {"partitioning": LAYER_PARTITIONING} if table in PARTITIONED else {}
        d = ds.dataset(base, format="parquet", filesystem=self.fs, **kw)
        for frag in d.get_fragments():
            check_version(frag.physical_schema, frag.path)
        return d

    def read_table(self, table: str, *, columns: list[str] | None = None, filter=None) -> pa.Table:
        """The whole table (or the filtered part), in the table's schema; empty when nothing is written."""
        schema = TABLES[table]
        d = self.dataset(table)
        if d is None:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        t = d.to_table(columns=columns, filter=filter)
        return t

    def read_table_file(self, rel: str, table: str) -> pa.Table:
        """One published file of `table` (without its partition column)."""
        with self.fs.open_input_file(self.path(rel)) as f:
            t = pq.read_table(f)
        check_version(t.schema, rel)
        return t

    def list_files(self, prefix: str) -> list[str]:
        sel = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        return [i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
