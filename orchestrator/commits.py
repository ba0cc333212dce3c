"""Which files of the shard tables (explanations, scores, ledger, calls) hold committed rows: the ones a shard's
marker lists. Every reader of those tables (the store's `read_table`, the results reader, `status`, `show`,
`view`, `report`, `export`, a shard's own retry) lists them through `committed_files`, so the files of a shard
that crashed before its marker, or of a re-commit (`--retry-failed`) that crashed before its new marker, are
never read: a reader sees each shard's last completed commit and nothing else. Such leftovers are harmless
(the next attempt at that commit writes the same names over them).

A marker written before markers listed their files stands for the shard's first-commit names
(`shard_file_name(shard_id)`). Rows imported from another tool (`shard-imported`) are committed once the
import's extraction marker, which the import writes last, exists.
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import pyarrow.fs as pafs

from schemas.layout import (
    EXTRACT_MARKER,
    IMPORTED,
    MARKERS_DIR,
    PARTITIONED,
    SHARD_TABLES,
    is_hidden,
    marker_shard_id,
    partition_dir,
    shard_file_name,
    shard_marker,
    table_file,
)

if TYPE_CHECKING:
    from orchestrator.store import RunStore

PARQUET = ".parquet"


def marker_files(shard_id: str, marker: dict) -> dict[str, list[str]]:
    """table -> the run-relative paths a shard's marker commits. A marker without a file list (written before
    markers had one) commits the first-commit name in every shard table; where its layer is unknown, the paths
    are the bare names (enough for `committed_names`, which matches file names)."""
    files = marker.get("files")
    if isinstance(files, dict):
        return {t: [str(p) for p in paths] for t, paths in files.items() if t in SHARD_TABLES}
    name = shard_file_name(shard_id)
    layer = marker.get("layer")
    out = {}
    for t in SHARD_TABLES:
        if t in PARTITIONED and not isinstance(layer, int):
            out[t] = [name + PARQUET]
        else:
            out[t] = [table_file(t, name, layer)]
    return out


class Markers:
    """The run's shard markers, read once and then re-read only when one is added, changed or removed, so a
    reader that polls a live run does not read every marker each time."""

    def __init__(self, store: RunStore):
        self.store = store
        self.docs: dict[str, dict] = {}  # shard id -> marker document
        self._stamps: dict[str, tuple] = {}
        self.imported = False  # the import's rows are committed (its extraction marker exists)
        self._names: dict[str, frozenset[str]] | None = None

    def refresh(self) -> bool:
        """List the markers again and read the new or changed ones; whether anything changed."""
        sel = pafs.FileSelector(self.store.path(MARKERS_DIR), recursive=False, allow_not_found=True)
        stamps = {}
        for info in self.store.fs.get_file_info(sel):
            shard_id = marker_shard_id(info.path) if info.type == pafs.FileType.File else None
            if shard_id is not None:
                stamps[shard_id] = (info.size, info.mtime_ns)
        todo = [s for s, st in stamps.items() if self._stamps.get(s) != st]
        gone = set(self._stamps) - set(stamps)
        imported = self.store.exists(EXTRACT_MARKER)
        if not todo and not gone and imported == self.imported:
            return False
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(todo)))) as pool:  # an object store: one GET each
            docs = list(pool.map(self._read, todo))
        for shard_id, doc in zip(todo, docs):
            if doc is None:  # removed since the listing (an operator redoing the shard)
                gone.add(shard_id)
                stamps.pop(shard_id)
            else:
                self.docs[shard_id] = doc if isinstance(doc, dict) else {}
        for shard_id in gone:
            self.docs.pop(shard_id, None)
        self._stamps, self.imported, self._names = stamps, imported, None
        return True

    def _read(self, shard_id: str) -> dict | None:
        try:
            return self.store.read_json(shard_marker(shard_id))
        except FileNotFoundError:
            return None

    def names(self, table: str) -> frozenset[str]:
        """The file names (not paths: shard ids are unique across layers) of `table` that are committed."""
        if self._names is None:
            names: dict[str, set[str]] = {t: set() for t in SHARD_TABLES}
            for shard_id, doc in self.docs.items():
                for t, paths in marker_files(shard_id, doc).items():
                    names[t].update(p.rsplit("/", 1)[-1] for p in paths)
            if self.imported:
                for t in SHARD_TABLES:
                    names[t].add(shard_file_name(IMPORTED) + PARQUET)
            self._names = {t: frozenset(v) for t, v in names.items()}
        return self._names.get(table, frozenset())


def shard_files(store: RunStore, shard_id: str, table: str, layer: int | None = None) -> list[str] | None:
    """Run-relative paths of one committed shard's files of `table` (its marker alone is read), or None when
    the shard is not committed. The imported rows count as one shard."""
    if shard_id == IMPORTED:
        return [table_file(table, shard_file_name(shard_id), layer)] if store.exists(EXTRACT_MARKER) else None
    if not store.exists(shard_marker(shard_id)):
        return None
    doc = store.read_json(shard_marker(shard_id))
    paths = marker_files(shard_id, doc if isinstance(doc, dict) else {}).get(table, [])
    return [p if "/" in p else table_file(table, p.removesuffix(PARQUET), layer) for p in paths]


def committed_files(store: RunStore, table: str, *, layer: int | None = None, markers: Markers | None = None,
                    include_uncommitted: bool = False) -> list[pafs.FileInfo]:
    """The published Parquet files of `table` (of one layer's partition with `layer`) that readers may read,
    sorted by path: for a shard table, only those its shards' markers commit (`markers`, refreshed by the
    caller, or read here); every visible file of any other table. `include_uncommitted` lists a shard table's
    uncommitted files too: only for the call journal's warm-up, where a paid answer is worth keeping whichever
    commit it belonged to."""
    root = store.path(partition_dir(table, layer) if layer is not None else table)
    sel = pafs.FileSelector(root, recursive=True, allow_not_found=True)
    infos = [i for i in store.fs.get_file_info(sel) if i.type == pafs.FileType.File and i.path.endswith(PARQUET)
             and not is_hidden(i.path[len(root):])]
    if table in SHARD_TABLES and not include_uncommitted:
        if markers is None:
            markers = Markers(store)
            markers.refresh()
        names = markers.names(table)
        infos = [i for i in infos if i.path.rsplit("/", 1)[-1] in names]
    return sorted(infos, key=lambda i: i.path)
