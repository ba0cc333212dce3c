"""The run directory: a local path or an object-store URI (s3://, gs://) through pyarrow.fs.

Every path inside it is built by `schemas/layout.py` (which also draws the whole layout).

A file is published atomically: written under a `_tmp` name and renamed on a local file system; on an
object store a single PUT is already atomic, so the object is written once under its final key. Readers
skip names starting with `_` or `.` (pyarrow's default), so partial state is never read, and of the shard tables
they read only the files a shard marker commits (orchestrator/commits.py).
"""
from __future__ import annotations

import json
import os
import uuid
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.commits import committed_files
from schemas.config import ConfigError
from schemas.layout import (
    EXTRACT_DIR,
    MARKERS_DIR,
    PARTITIONED,
    SHARD_FILE_PREFIX,
    TMP_PREFIX,
    shard_marker,
    shard_of_file,
    table_file,
)
from schemas.tables import TABLES, check_version, units_metadata

LAYER_PARTITIONING = ds.partitioning(pa.schema([("layer", pa.int16())]), flavor="hive")


class RunDirectoryError(ConfigError):
    """A run directory that is damaged, edited by hand, or in use by another driver: one line naming the file
    and what to do. A ConfigError, so every command prints it as one line and exits 2, never a traceback."""


class DamagedFileError(RunDirectoryError):
    """A file of the run directory that cannot be read as what it should be (truncated, not JSON, not Parquet)."""


def repair_hint(rel: str) -> str:
    """What to do about a damaged file at `rel` (relative to the run's root)."""
    table = rel.split("/", 1)[0]
    name = rel.rsplit("/", 1)[-1]
    if table in ("explanations", "scores", "ledger", "calls") and name.startswith(SHARD_FILE_PREFIX):
        # the shard is redone under the same file names (no duplicate rows), its paid calls from the journal
        return f"delete {shard_marker(shard_of_file(rel))} and resume the run: the shard is done again"
    if table == MARKERS_DIR:
        return "delete it and resume the run: the shard is done again"
    if table in ("records", "sequences", "neuron_stats") or table == EXTRACT_DIR:
        return "restore it from a copy of the run, or extract again into a new --out directory"
    return "restore it from a copy of the run, or start again in a new --out directory"


def damaged(path: str, rel: str, what: str) -> DamagedFileError:
    return DamagedFileError(f"{path} is damaged ({what}); {repair_hint(rel)}")


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
    # the run's unit source once the run records it (orchestrator/units.py), for every table file's metadata
    _units: dict | None = field(default=None, repr=False, compare=False)

    @classmethod
    def open(cls, uri: str, *, s3_options: dict | None = None, create: bool = False) -> RunStore:
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
            data = f.read()
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError, or bytes that are not UTF-8
            raise damaged(self.path(rel), rel, f"not valid JSON: {_first_line(e)}") from None

    def write_bytes(self, rel: str, data: bytes) -> None:
        final = self.path(rel)
        self.fs.create_dir(final.rsplit("/", 1)[0], recursive=True)
        if self.is_local:
            tmp = f"{final.rsplit('/', 1)[0]}/{TMP_PREFIX}{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
            _fsync_dir(final.rsplit("/", 1)[0])  # the rename itself survives a power loss
        else:
            with self.fs.open_output_stream(final) as f:
                f.write(data)

    # --- Parquet tables --------------------------------------------------------------------------------------
    def table_file(self, table: str, name: str, layer: int | None = None) -> str:
        return table_file(table, name, layer)

    def write_table(self, table: str, data: pa.Table, name: str, layer: int | None = None) -> str:
        """Publish one Parquet file of `table` atomically under a deterministic name (a retry overwrites it)."""
        schema = TABLES[table]
        data = data.cast(schema) if data.schema != schema else data
        if table in PARTITIONED:
            data = data.drop_columns(["layer"])
        rel = self.table_file(table, name, layer)
        sink = pa.BufferOutputStream()
        pq.write_table(data.replace_schema_metadata({**schema.metadata, **self._units_metadata()}), sink,
                       compression="zstd")
        self.write_bytes(rel, sink.getvalue().to_pybytes())
        return rel

    def _units_metadata(self) -> dict[bytes, bytes]:
        if self._units is None:
            from orchestrator.units import recorded_source

            self._units = recorded_source(self)  # stays None (and is looked up again) until the run records it
        return units_metadata(self._units) if self._units is not None else {}

    def dataset(self, table: str, *, include_uncommitted: bool = False) -> ds.Dataset | None:
        """The table's files as one dataset, or None when it has none; of a shard table only the committed
        files (orchestrator/commits.py; `include_uncommitted` for the call journal's warm-up only)."""
        base = self.path(table)
        files = [i.path for i in committed_files(self, table, include_uncommitted=include_uncommitted)]
        if not files:
            return None
        kw = {"partitioning": LAYER_PARTITIONING, "partition_base_dir": base} if table in PARTITIONED else {}
        # the current schema, not the first file's: a file from an older minor version reads its missing
        # (nullable) columns as null, whichever file the scan happens to open first
        return self.open_dataset(files, schema=TABLES[table], **kw)

    def open_dataset(self, files: list[str], **kw) -> ds.Dataset:
        """A Parquet dataset over `files` (full paths of this store, as listed), each file version-checked; a
        damaged file (truncated, not Parquet) is a one-line error naming it and what to do."""
        try:
            d = ds.dataset(files, format="parquet", filesystem=self.fs, **kw)
            schemas = [(frag.path, frag.physical_schema) for frag in d.get_fragments()]
        except (pa.ArrowInvalid, OSError) as e:
            for path in files:  # which one: read each footer
                try:
                    pq.read_metadata(path, filesystem=self.fs)
                except (pa.ArrowInvalid, OSError) as bad:
                    raise damaged(path, self.relative(path), _first_line(bad)) from None
            raise e
        for path, schema in schemas:
            check_version(schema, path)
        return d

    def read_table(self, table: str, *, columns: list[str] | None = None, filter=None,
                   include_uncommitted: bool = False) -> pa.Table:
        """The whole table (or the filtered part), in the table's schema; empty when nothing is written. Of a
        shard table, only committed shards' rows (see `dataset`)."""
        schema = TABLES[table]
        d = self.dataset(table, include_uncommitted=include_uncommitted)
        if d is None:
            empty = schema.empty_table()
            return empty.select(columns) if columns else empty
        t = d.to_table(columns=columns, filter=filter)
        return t

    def read_table_file(self, rel: str, table: str) -> pa.Table:
        """One published file of `table` (without its partition column)."""
        try:
            with self.fs.open_input_file(self.path(rel)) as f:
                t = pq.read_table(f)
        except (pa.ArrowInvalid, OSError) as e:
            if not self.exists(rel):
                raise
            raise damaged(self.path(rel), rel, _first_line(e)) from None
        check_version(t.schema, rel)
        return t

    def parquet_file(self, path: str) -> pq.ParquetFile:
        """An open Parquet file at a full `path` of this store (as listed); a damaged one is a one-line error."""
        try:
            return pq.ParquetFile(path, filesystem=self.fs)
        except (pa.ArrowInvalid, OSError) as e:
            if self.fs.get_file_info(path).type == pafs.FileType.NotFound:
                raise
            raise damaged(path, self.relative(path), _first_line(e)) from None

    def relative(self, path: str) -> str:
        """A full path of this store (as listed) relative to the run's root."""
        return path[len(self.root):].lstrip("/") if path.startswith(self.root) else path

    def remove_temporary_files(self) -> list[str]:
        """Delete the half-written files a crashed writer left (`_tmp-*`; only a local disk has them: an object
        store is written with single PUTs). Only for the holder of the run lease: another writer's file in
        flight would go too. Returns the paths removed."""
        if not self.is_local:
            return []
        removed = []
        for folder, _dirs, files in os.walk(self.root):
            for name in files:
                if name.startswith(TMP_PREFIX):
                    path = os.path.join(folder, name)
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                    removed.append(path)
        return removed

    def list_files(self, prefix: str) -> list[str]:
        sel = pafs.FileSelector(self.path(prefix), recursive=True, allow_not_found=True)
        return [i.path for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform that cannot open a folder (Windows): the rename is as durable as it gets
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the rename itself is already atomic
    finally:
        os.close(fd)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


# --- S3 options: the keys stay out of what travels to Ray actors ------------------------------------------------
S3_SECRET_OPTIONS = ("access_key", "secret_key", "session_token")


def without_secrets(s3_options: dict | None) -> dict | None:
    """The S3 options less the keys: what may travel to a Ray actor, which reads the keys from its own
    environment (`with_env_credentials`)."""
    if s3_options is None:
        return None
    return {k: v for k, v in s3_options.items() if k not in S3_SECRET_OPTIONS}


def with_env_credentials(s3_options: dict | None, e) -> dict | None:
    """The S3 options with the keys of the environment `e` (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
    AWS_SESSION_TOKEN); without them, pyarrow's own AWS credential chain decides (instance role, IRSA)."""
    if s3_options is None:
        return None
    opts = dict(s3_options)
    if e.get("AWS_ACCESS_KEY_ID"):
        opts.update(access_key=e["AWS_ACCESS_KEY_ID"], secret_key=e.get("AWS_SECRET_ACCESS_KEY", ""))
        if e.get("AWS_SESSION_TOKEN"):
            opts["session_token"] = e["AWS_SESSION_TOKEN"]
    return opts
