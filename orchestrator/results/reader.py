"""Reading a run's results: the neuron index, one neuron's full detail, and the run's progress.

    reader = RunReader(RunStore.open("runs/demo"))
    index = reader.index()                                # one row per processed neuron (pyarrow Table)
    page, total = query_index(index, layer=3, min_score=0.5, text="python code", limit=50)   # index.py
    detail = reader.neuron(3, 117)                        # explanations, scores, records with their tokens
    progress = reader.progress()                          # counts, tokens, cost, failures by reason

A run may still be running, so the reader keeps each Parquet file it has read and, at most every `refresh_s`
seconds, lists the markers and table folders again and reads only new or changed files, then rebuilds the index
(index.py's `build_index`). Of the shard tables it reads only committed files (`committed_files`,
orchestrator/commits.py): a shard that crashed before its marker, or a retry's re-commit that crashed before its
new one, is not seen. Only the small columns are held in memory; per-record columns (activations, simulated
values) are read for one neuron at a time. Paths are schemas/layout.py's.
"""
from __future__ import annotations

import re
import threading
import time

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from orchestrator.commits import Markers, committed_files, shard_files
from orchestrator.plan import IMPORTED
from orchestrator.results.index import (
    HEADLINE_SCORER,
    SCORE_COLUMNS,
    Progress,
    build_index,
    latest_ledger,
    summarize_progress,
)
from orchestrator.store import RunStore
from schemas.layout import EXTRACT_MARKER, RUN_FILE, SHARD_TABLES, shard_of_file
from schemas.tables import NEGATIVE, POLARITIES, POSITIVE, TABLES, check_version

# what the index keeps of each table (per-record lists stay on disk)
INDEX_COLUMNS = {
    "ledger": ["neuron", "status", "attempts", "error", "reason", "updated_at", "shard_id", "prompt_tokens",
               "completion_tokens", "cost_usd", "elapsed_s"],
    "explanations": ["neuron", "explanation", "candidate", "selected", "explainer_model", "created_at",
                     "prompt_tokens", "completion_tokens", "polarity"],
    "scores": ["neuron", "candidate", "scorer", "polarity", *SCORE_COLUMNS],
}


def _file_layer(path: str) -> int | None:
    m = re.search(r"/layer=(\d+)/", path)
    return int(m.group(1)) if m else None


def read_file(store: RunStore, table: str, path: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """One Parquet file of `table`, version-checked, with `layer` (from its folder) and `shard` (its name)."""
    pf = store.parquet_file(path)  # a damaged file: one line naming it and what to do
    check_version(pf.schema_arrow, path)
    t = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names] if columns else None)
    if filter is not None:
        t = t.filter(filter)
    layer = _file_layer(path)
    if "layer" not in t.column_names:
        t = t.add_column(0, "layer", pa.array([layer] * t.num_rows, pa.int16()))
    return t.append_column("shard", pa.array([shard_of_file(path)] * t.num_rows, pa.string()))


def _empty(table: str, columns: list[str]) -> pa.Table:
    s = TABLES[table]
    fields = [s.field("layer")] + [s.field(c) for c in columns if c != "layer"] + [pa.field("shard", pa.string())]
    return pa.schema(fields).empty_table()


def read_all(store: RunStore, table: str, columns: list[str] | None = None) -> pa.Table:
    """Every committed file of a partitioned table, with `layer` and `shard` columns, in the table's types."""
    files = [i.path for i in committed_files(store, table)]
    cols = columns or [f.name for f in TABLES[table] if f.name != "layer"]
    parts = [_conform(read_file(store, table, p, cols), table, cols) for p in files]
    return pa.concat_tables(parts) if parts else _empty(table, cols)


def _conform(t: pa.Table, table: str, columns: list[str]) -> pa.Table:
    """Missing nullable columns (an older minor version) become nulls; types are the schema's. A row without a
    `polarity` (written before schema 1.4, when only the positive side was explained) reads as positive."""
    target = _empty(table, columns).schema
    arrays = [t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in target]
    if "polarity" in target.names:
        i = target.get_field_index("polarity")
        arrays[i] = pc.fill_null(arrays[i], POSITIVE)
    return pa.Table.from_arrays(arrays, schema=target)


class _FileCache:
    """A table's files as last read; `table()` re-reads only files that are new or changed since."""

    def __init__(self, store: RunStore, table: str, columns: list[str]):
        self.store, self.name, self.columns = store, table, columns
        self.files: dict[str, tuple[tuple, pa.Table]] = {}
        self.signature: tuple = ()

    def refresh(self, markers: Markers) -> bool:
        infos = committed_files(self.store, self.name, markers=markers)
        stamp = {i.path: (i.size, i.mtime_ns) for i in infos}
        signature = tuple(sorted(stamp.items()))
        if signature == self.signature:
            return False
        kept = {}
        for path, st in stamp.items():
            old = self.files.get(path)
            kept[path] = old if old and old[0] == st else \
                (st, _conform(read_file(self.store, self.name, path, self.columns), self.name, self.columns))
        self.files, self.signature = kept, signature
        return True

    def table(self) -> pa.Table:
        parts = [t for _, (_, t) in sorted(self.files.items())]
        return pa.concat_tables(parts) if parts else _empty(self.name, self.columns)


class RunReader:
    """A run directory's results, kept current while a sweep writes to it (see the module docstring)."""

    def __init__(self, store: RunStore, *, refresh_s: float = 2.0, headline: str | None = None):
        self.store, self.refresh_s = store, refresh_s
        self._caches = {t: _FileCache(store, t, cols) for t, cols in INDEX_COLUMNS.items()}
        self._markers = Markers(store)
        self._lock = threading.Lock()
        self._checked = float("-inf")
        self._index: pa.Table | None = None
        self._headline = headline
        self.version = 0  # bumps whenever the index changes (viewers use it to cache pages)

    # --- run-level ---------------------------------------------------------------------------------------
    def run_info(self) -> dict:
        """run.json, or {} while the planner has not written it (read defensively: fields may be missing)."""
        try:
            info = self.store.read_json(RUN_FILE) if self.store.exists(RUN_FILE) else {}
        except (OSError, ValueError):
            info = {}
        return info if isinstance(info, dict) else {}

    def extract_marker(self) -> dict | None:
        try:
            return self.store.read_json(EXTRACT_MARKER) if self.store.exists(EXTRACT_MARKER) else None
        except (OSError, ValueError):
            return None

    def headline(self) -> str:
        if self._headline:
            return self._headline
        scorers = ((self.run_info().get("config") or {}).get("scorers")) or [HEADLINE_SCORER]
        return HEADLINE_SCORER if HEADLINE_SCORER in scorers else scorers[0]

    def index(self) -> pa.Table:
        with self._lock:
            now = time.monotonic()
            if self._index is None or now - self._checked >= self.refresh_s:
                self._checked = now
                self._markers.refresh()
                changed = [c.refresh(self._markers) for c in self._caches.values()]
                if any(changed) or self._index is None:
                    c = self._caches
                    self._index = build_index(c["ledger"].table(), c["explanations"].table(),
                                              c["scores"].table(), self.headline())
                    self.version += 1
            return self._index

    def progress(self) -> Progress:
        index = self.index()  # refreshes the markers too: the count below is the index's
        return summarize_progress(index, self.run_info(), extracted=self.extract_marker() is not None,
                                  shards_committed=len(self._markers.docs))

    # --- one neuron --------------------------------------------------------------------------------------
    def neuron(self, layer: int, neuron: int) -> dict:
        idx = self.index()
        hit = idx.filter(pc.and_(pc.equal(idx["layer"], layer), pc.equal(idx["neuron"], neuron)))
        shard = hit["shard_id"][0].as_py() if hit.num_rows else None
        return neuron_detail(self.store, layer, neuron, shard)


def _read_partition(store: RunStore, table: str, layer: int, neuron: int, shard: str | None = None) -> pa.Table:
    """One neuron's committed rows of a table's layer partition. With `shard`, only that shard's committed file
    (and an import's) is read when it exists: a neuron page then opens a few files, not every shard of the layer."""
    cols = [f.name for f in TABLES[table] if f.name != "layer"]
    files = []
    if shard is not None and table in SHARD_TABLES:
        files = [store.path(rel) for name in dict.fromkeys((shard, IMPORTED))
                 for rel in shard_files(store, name, table, layer) or [] if store.exists(rel)]
    if not files:
        files = [i.path for i in committed_files(store, table, layer=layer)]
    if not files:
        return _empty(table, cols)
    # the current schema, not the first file's: a file of an older minor version (say, without `polarity`) next to
    # newer ones reads its missing columns as nulls, and theirs are kept; version-checked; a damaged file: one line
    # naming it and what to do
    schema = TABLES[table]
    d = store.open_dataset(files, schema=pa.schema([f for f in schema if f.name != "layer"], metadata=schema.metadata))
    t = d.to_table(columns=[*d.schema.names, "__filename"], filter=ds.field("neuron") == neuron)
    names = t["__filename"].to_pylist()
    t = t.drop_columns(["__filename"]).add_column(0, "layer", pa.array([layer] * t.num_rows, pa.int16()))
    t = t.append_column("shard", pa.array([shard_of_file(p) for p in names], pa.string()))
    return _conform(t, table, cols)


def sequence_tokens(store: RunStore, seq_ids: list[int]) -> dict[int, list[str]]:
    """Token strings of the given windows, read from `sequences` (stored once, shared by every neuron)."""
    d = store.dataset("sequences") if seq_ids else None
    if d is None:
        return {}
    t = d.to_table(columns=["seq_id", "tokens"], filter=ds.field("seq_id").isin(sorted(set(seq_ids))))
    return dict(zip(t["seq_id"].to_pylist(), t["tokens"].to_pylist()))


def neuron_detail(store: RunStore, layer: int, neuron: int, shard: str | None = None) -> dict:
    """Everything stored about one neuron, with each record's tokens joined from `sequences`:
    {layer, neuron, ledger (latest row or None), stats, explanations (selected first), scores,
     records: {top, bottom, random, quantile: [{rank, seq_id, tokens, activations, max_activation}]},
     scored: {scorer: [{seq_id, kind, tokens, true, simulated, per_sequence}]},
     negative: None, or the negative side's {explanations, scores, scored} (docs/method.md §1 "Both signs")}.
    The top-level explanations, scores and scored are the positive side's. The negative side's scored records
    carry the negated activations it was scored on (`true`). `shard` (the ledger's shard id, when the caller
    knows it) limits the reads to that shard's files."""
    ledger = _read_partition(store, "ledger", layer, neuron, shard)
    led = latest_ledger(ledger).to_pylist()[0] if ledger.num_rows else None
    expl = _read_partition(store, "explanations", layer, neuron, shard)
    shard = led["shard_id"] if led else None
    expl_rows = sorted(expl.to_pylist(), key=lambda r: (r["shard"] != shard, not r["selected"], r["candidate"]))
    if shard is not None and any(r["shard"] == shard for r in expl_rows):
        expl_rows = [r for r in expl_rows if r["shard"] == shard]
    scores = _read_partition(store, "scores", layer, neuron, shard).to_pylist()
    if shard is not None and any(r["shard"] == shard for r in scores):
        scores = [r for r in scores if r["shard"] == shard]
    stats = _read_partition(store, "neuron_stats", layer, neuron).to_pylist()
    recs = _read_partition(store, "records", layer, neuron).to_pylist()

    seq_ids = [r["seq_id"] for r in recs] + [s for sc in scores for s in (sc["seq_ids"] or [])]
    tokens = sequence_tokens(store, seq_ids)
    records: dict[str, list] = {"top": [], "bottom": [], "random": [], "quantile": []}
    # seq_id -> (kind, activations) a side was scored on: the positive side's windows are never bottom records,
    # the negative side's are its bottom (else random) records, negated
    true_by_seq: dict[str, dict[int, tuple[str, list]]] = {POSITIVE: {}, NEGATIVE: {}}
    for r in sorted(recs, key=lambda r: (r["kind"], r["rank"])):
        records.setdefault(r["kind"], []).append({
            "rank": r["rank"], "seq_id": r["seq_id"], "tokens": tokens.get(r["seq_id"], []),
            "activations": r["activations"], "max_activation": r["max_activation"]})
        if r["kind"] != "bottom":
            true_by_seq[POSITIVE].setdefault(r["seq_id"], (r["kind"], r["activations"]))
        if r["kind"] in ("bottom", "random"):
            negated = [None if x is None else -x for x in r["activations"]]
            true_by_seq[NEGATIVE].setdefault(r["seq_id"], (r["kind"], negated))
    sides = {p: {"explanations": [r for r in expl_rows if r["polarity"] == p],
                 "scores": [r for r in scores if r["polarity"] == p],
                 "scored": _scored(scores, p, tokens, true_by_seq[p])} for p in POLARITIES}
    negative = sides[NEGATIVE] if sides[NEGATIVE]["explanations"] or sides[NEGATIVE]["scores"] else None
    return {"layer": layer, "neuron": neuron, "ledger": led, "stats": stats[0] if stats else None,
            **sides[POSITIVE], "records": records, "negative": negative}


def _scored(scores: list[dict], polarity: str, tokens: dict[int, list[str]],
            true_by_seq: dict[int, tuple[str, list]]) -> dict[str, list]:
    """scorer -> the records one side's simulation scored, each with its true and simulated values."""
    scored: dict[str, list] = {}
    for sc in scores:
        if sc["polarity"] != polarity or not sc.get("simulated"):
            continue
        per = sc.get("per_sequence") or []
        scored[sc["scorer"]] = [{
            "seq_id": s, "kind": true_by_seq.get(s, ("?", None))[0], "tokens": tokens.get(s, []),
            "true": true_by_seq.get(s, ("?", []))[1], "simulated": sim,
            "per_sequence": per[i] if i < len(per) else None}
            for i, (s, sim) in enumerate(zip(sc["seq_ids"] or [], sc["simulated"]))]
    return scored
