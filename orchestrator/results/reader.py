"""Reading a run's results: the neuron index, one neuron's full detail, and the run's progress.

    reader = RunReader(RunStore.open("runs/demo"))
    index = reader.index()                                # one row per processed neuron (pyarrow Table)
    page, total = query_index(index, layer=3, min_score=0.5, text="python code", limit=50)
    detail = reader.neuron(3, 117)                        # explanations, scores, records with their tokens
    progress = reader.progress()                          # counts, tokens, cost, failures by reason

The index is the ledger (each neuron's latest row) joined with the selected explanation and the headline
score. A run may still be running, so the reader keeps each Parquet file it has read and, at most every
`refresh_s` seconds, lists the table folders again and reads only new or changed files. Only the small
columns are held in memory; per-record columns (activations, simulated values) are read for one neuron at a
time. The pure functions (`build_index`, `query_index`, `summarize_progress`, `failure_reason`) work on tables
and are what `neuronsweep status/show`, the viewer and the report share.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from orchestrator.plan import EXTRACT_MARKER, IMPORTED
from orchestrator.store import RunStore
from orchestrator.metrics import failure_reason  # one bounded vocabulary: metrics, status, viewer
from schemas.tables import TABLES, check_version

RUN_FILE = "run.json"
HEADLINE_SCORER = "correlation"
SCORE_COLUMNS = ["score", "score_top", "score_random", "r2", "absdev", "null_reason", "simulator_model",
                 "simulator_mode"]
# what the index keeps of each table (per-record lists stay on disk)
INDEX_COLUMNS = {
    "ledger": ["neuron", "status", "attempts", "error", "updated_at", "shard_id", "prompt_tokens",
               "completion_tokens", "cost_usd", "elapsed_s"],
    "explanations": ["neuron", "explanation", "candidate", "selected", "explainer_model", "created_at",
                     "prompt_tokens", "completion_tokens"],
    "scores": ["neuron", "candidate", "scorer", *SCORE_COLUMNS],
}
SORTABLE = ("score", "layer", "neuron", "score_top", "score_random", "r2", "absdev", "cost_usd")


# --- pure functions over tables ---------------------------------------------------------------------------
def neuron_key(layer: pa.Array, neuron: pa.Array) -> np.ndarray:
    """One int64 per (layer, neuron), ordered like the pair."""
    return (np.asarray(layer, dtype=np.int64) << 32) | np.asarray(neuron, dtype=np.int64)


def last_per_key(table: pa.Table, keys: list[str], order: list[str]) -> pa.Table:
    """For each distinct value of `keys`, the row that sorts last by `order` (ascending, nulls first)."""
    if table.num_rows == 0:
        return table
    sort = [(k, "ascending", "at_start") for k in keys + order]
    t = table.take(pc.sort_indices(table, sort_keys=sort))
    same_as_next = np.ones(t.num_rows, dtype=bool)
    for k in keys:
        col = t.column(k).to_numpy(zero_copy_only=False)
        same_as_next[:-1] &= col[:-1] == col[1:]
    same_as_next[-1] = False
    return t.filter(pa.array(~same_as_next))


def _latest_ledger(ledger: pa.Table) -> pa.Table:
    """Each neuron's latest ledger row; at equal times a done row wins over a failed one."""
    rank = pc.if_else(pc.equal(ledger["status"], "done"), 2, pc.if_else(pc.equal(ledger["status"], "skipped"), 1, 0))
    return last_per_key(ledger.append_column("_rank", rank), ["layer", "neuron"], ["updated_at", "_rank"]) \
        .drop_columns(["_rank"])


def _prefer_ledger_shard(table: pa.Table, ledger: pa.Table, keys: list[str], order: list[str]) -> pa.Table:
    """One row per `keys`, preferring rows written by the shard the ledger's latest row names (a neuron swept
    again, e.g. after an import, has rows in two shards), then the last by `order`."""
    shards = ledger.select(["layer", "neuron", "shard_id"])
    t = table.join(shards, ["layer", "neuron"], join_type="left outer")
    match = pc.fill_null(pc.equal(t["shard"], t["shard_id"]), False)
    t = t.append_column("_match", match).drop_columns(["shard_id"])
    return last_per_key(t, keys, ["_match", *order]).drop_columns(["_match"])


def build_index(ledger: pa.Table, explanations: pa.Table, scores: pa.Table,
                headline: str = HEADLINE_SCORER) -> pa.Table:
    """One row per neuron in the ledger: its latest status, its selected explanation, its `headline` score
    (columns `score`, `score_top`, ...) and the plain score of every other scorer (`<scorer>_score`).

    Every input has `layer`, `neuron` and a `shard` column (the file's shard id, or null)."""
    led = _latest_ledger(ledger)
    idx = led.drop_columns([c for c in ("shard", "updated_at") if c in led.column_names])

    sel = explanations.filter(pc.fill_null(explanations["selected"], True)) if explanations.num_rows else explanations
    if sel.num_rows:
        sel = _prefer_ledger_shard(sel, led, ["layer", "neuron"], ["created_at", "candidate"])
        sel = sel.select(["layer", "neuron", "explanation", "explainer_model"])
        idx = idx.join(sel, ["layer", "neuron"], join_type="left outer")
    else:
        idx = idx.append_column("explanation", pa.nulls(idx.num_rows, pa.string())) \
                 .append_column("explainer_model", pa.nulls(idx.num_rows, pa.string()))

    best = _prefer_ledger_shard(scores, led, ["layer", "neuron", "scorer"], ["candidate"]) if scores.num_rows \
        else scores
    head = best.filter(pc.equal(best["scorer"], headline)) if best.num_rows else best
    if head.num_rows:
        idx = idx.join(head.select(["layer", "neuron", *SCORE_COLUMNS]), ["layer", "neuron"], join_type="left outer")
    else:
        for c in SCORE_COLUMNS:
            idx = idx.append_column(c, pa.nulls(idx.num_rows, TABLES["scores"].field(c).type))
    other = sorted(set(best["scorer"].to_pylist()) - {headline}) if best.num_rows else []
    for scorer in other:
        part = best.filter(pc.equal(best["scorer"], scorer)).select(["layer", "neuron", "score"]) \
            .rename_columns(["layer", "neuron", f"{scorer}_score"])
        idx = idx.join(part, ["layer", "neuron"], join_type="left outer")
    order = pc.sort_indices(idx, sort_keys=[("layer", "ascending"), ("neuron", "ascending")])
    return idx.take(order).combine_chunks()


def query_index(index: pa.Table, *, layer: int | None = None, min_score: float | None = None,
                max_score: float | None = None, text: str | None = None, status: str | None = None,
                sort: str = "score", descending: bool = True, offset: int = 0,
                limit: int = 50) -> tuple[pa.Table, int]:
    """One page of the index and the number of rows that match. `text` matches explanations that contain
    every one of its words (case-insensitive). A score range leaves out null scores. Nulls sort last."""
    mask = None

    def both(m):
        nonlocal mask
        mask = m if mask is None else pc.and_kleene(mask, m)

    if layer is not None:
        both(pc.equal(index["layer"], layer))
    if status:
        both(pc.equal(index["status"], status))
    if min_score is not None:
        both(pc.greater_equal(index["score"], min_score))
    if max_score is not None:
        both(pc.less_equal(index["score"], max_score))
    for word in (text or "").split():
        both(pc.match_substring(index["explanation"], word, ignore_case=True))
    t = index if mask is None else index.filter(pc.fill_null(mask, False))
    if sort not in SORTABLE or sort not in t.column_names:
        sort = "score"
    direction = "descending" if descending else "ascending"
    keys = [(sort, direction)] + [(k, "ascending") for k in ("layer", "neuron") if k != sort]
    top = offset + limit
    if t.num_rows > 4 * top:  # the first pages: a partial sort (select-k) of the rows with a value is cheaper
        valued = t.filter(pc.is_valid(t[sort]))
        if valued.num_rows >= top:
            head = valued.take(pc.select_k_unstable(valued, k=top, sort_keys=keys))
            return head.take(pc.sort_indices(head, sort_keys=keys)).slice(offset, limit), t.num_rows
    order = pc.sort_indices(t, sort_keys=[(k, d, "at_end") for k, d in keys])
    return t.take(order.slice(offset, limit)), t.num_rows


@dataclass
class Progress:
    planned: int | None
    done: int = 0
    failed: int = 0
    skipped: int = 0
    extracted: bool = False
    shards_committed: int = 0
    n_shards: int | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    scored: int = 0  # done neurons with a defined headline score
    mean_score: float | None = None
    by_layer: dict[int, dict] = field(default_factory=dict)  # layer -> {done, failed, skipped, mean_score}
    failures: dict[str, int] = field(default_factory=dict)   # reason -> count

    @property
    def processed(self) -> int:
        return self.done + self.failed + self.skipped

    @property
    def pending(self) -> int | None:
        return None if self.planned is None else max(0, self.planned - self.processed)

    @property
    def fraction(self) -> float | None:
        return None if not self.planned else self.processed / self.planned

    def to_dict(self) -> dict:
        d = dict(self.__dict__)
        d.update(processed=self.processed, pending=self.pending, fraction=self.fraction)
        return d


def summarize_progress(index: pa.Table, run: dict | None = None, *, extracted: bool = False,
                       shards_committed: int = 0) -> Progress:
    """Counts, spend and scores of an index (see `build_index`), against the plan in run.json when given."""
    plan = (run or {}).get("plan") or {}
    p = Progress(planned=plan.get("n_neurons"), n_shards=plan.get("n_shards") or
                 (len(plan["shards"]) if isinstance(plan.get("shards"), list) else None),
                 extracted=extracted, shards_committed=shards_committed)
    rows = index.select([c for c in ("layer", "status", "error", "score", "prompt_tokens", "completion_tokens",
                                     "cost_usd") if c in index.column_names]).to_pylist()
    scores = []
    for r in rows:
        layer = p.by_layer.setdefault(int(r["layer"]), {"done": 0, "failed": 0, "skipped": 0, "_scores": []})
        status = r["status"] if r["status"] in ("done", "failed", "skipped") else "failed"
        layer[status] += 1
        setattr(p, status, getattr(p, status) + 1)
        p.prompt_tokens += r.get("prompt_tokens") or 0
        p.completion_tokens += r.get("completion_tokens") or 0
        p.cost_usd += r.get("cost_usd") or 0.0
        if status == "failed":
            reason = failure_reason(r.get("error"))
            p.failures[reason] = p.failures.get(reason, 0) + 1
        if status == "done" and r.get("score") is not None:
            scores.append(r["score"])
            layer["_scores"].append(r["score"])
    for layer in p.by_layer.values():
        s = layer.pop("_scores")
        layer["mean_score"] = float(np.mean(s)) if s else None
        layer["scored"] = len(s)
    p.by_layer = dict(sorted(p.by_layer.items()))
    p.failures = dict(sorted(p.failures.items(), key=lambda kv: (-kv[1], kv[0])))
    p.scored = len(scores)
    p.mean_score = float(np.mean(scores)) if scores else None
    return p


# --- reading files ----------------------------------------------------------------------------------------
def _file_layer(path: str) -> int | None:
    m = re.search(r"/layer=(\d+)/", path)
    return int(m.group(1)) if m else None


def _file_shard(path: str) -> str:
    name = path.rsplit("/", 1)[-1].removesuffix(".parquet")
    return name.removeprefix("shard-")


def _visible(path: str, base: str) -> bool:
    return path.endswith(".parquet") and not any(p.startswith(("_", ".")) for p in path[len(base):].split("/") if p)


def read_file(store: RunStore, table: str, path: str, columns: list[str] | None = None, filter=None) -> pa.Table:
    """One Parquet file of `table`, version-checked, with `layer` (from its folder) and `shard` (its name)."""
    pf = pq.ParquetFile(path, filesystem=store.fs)
    check_version(pf.schema_arrow, path)
    t = pf.read(columns=[c for c in columns if c in pf.schema_arrow.names] if columns else None)
    if filter is not None:
        t = t.filter(filter)
    layer = _file_layer(path)
    if "layer" not in t.column_names:
        t = t.add_column(0, "layer", pa.array([layer] * t.num_rows, pa.int16()))
    return t.append_column("shard", pa.array([_file_shard(path)] * t.num_rows, pa.string()))


def _empty(table: str, columns: list[str]) -> pa.Table:
    s = TABLES[table]
    fields = [s.field("layer")] + [s.field(c) for c in columns if c != "layer"] + [pa.field("shard", pa.string())]
    return pa.schema(fields).empty_table()


def read_all(store: RunStore, table: str, columns: list[str] | None = None) -> pa.Table:
    """Every visible file of a partitioned table, with `layer` and `shard` columns, in the table's types."""
    base = store.path(table)
    files = sorted(p for p in store.list_files(table) if _visible(p, base))
    cols = columns or [f.name for f in TABLES[table] if f.name != "layer"]
    parts = [_conform(read_file(store, table, p, cols), table, cols) for p in files]
    return pa.concat_tables(parts) if parts else _empty(table, cols)


def _conform(t: pa.Table, table: str, columns: list[str]) -> pa.Table:
    """Missing nullable columns (an older minor version) become nulls; types are the schema's."""
    target = _empty(table, columns).schema
    arrays = [t[f.name].cast(f.type) if f.name in t.column_names else pa.nulls(t.num_rows, f.type) for f in target]
    return pa.Table.from_arrays(arrays, schema=target)


class _FileCache:
    """A table's files as last read; `table()` re-reads only files that are new or changed since."""

    def __init__(self, store: RunStore, table: str, columns: list[str]):
        self.store, self.name, self.columns = store, table, columns
        self.files: dict[str, tuple[tuple, pa.Table]] = {}
        self.signature: tuple = ()

    def refresh(self) -> bool:
        base = self.store.path(self.name)
        sel = pafs.FileSelector(base, recursive=True, allow_not_found=True)
        infos = [i for i in self.store.fs.get_file_info(sel)
                 if i.type == pafs.FileType.File and _visible(i.path, base)]
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
                changed = [c.refresh() for c in self._caches.values()]
                if any(changed) or self._index is None:
                    c = self._caches
                    self._index = build_index(c["ledger"].table(), c["explanations"].table(),
                                              c["scores"].table(), self.headline())
                    self.version += 1
            return self._index

    def progress(self) -> Progress:
        markers = [p for p in self.store.list_files("_markers") if p.endswith(".json")]
        return summarize_progress(self.index(), self.run_info(), extracted=self.extract_marker() is not None,
                                  shards_committed=len(markers))

    # --- one neuron --------------------------------------------------------------------------------------
    def neuron(self, layer: int, neuron: int) -> dict:
        idx = self.index()
        hit = idx.filter(pc.and_(pc.equal(idx["layer"], layer), pc.equal(idx["neuron"], neuron)))
        shard = hit["shard_id"][0].as_py() if hit.num_rows else None
        return neuron_detail(self.store, layer, neuron, shard)


def _read_partition(store: RunStore, table: str, layer: int, neuron: int, shard: str | None = None) -> pa.Table:
    """One neuron's rows of a table's layer partition. With `shard`, only that shard's file (and an import's)
    is read when it exists: a neuron page then opens a few files, not every shard of the layer."""
    base = store.path(f"{table}/layer={layer}")
    cols = [f.name for f in TABLES[table] if f.name != "layer"]
    files = []
    if shard is not None:
        files = [p for name in dict.fromkeys((shard, IMPORTED))
                 if store.exists(rel := f"{table}/layer={layer}/shard-{name}.parquet") for p in [store.path(rel)]]
    if not files:
        files = sorted(p for p in store.list_files(f"{table}/layer={layer}") if _visible(p, base))
    if not files:
        return _empty(table, cols)
    d = ds.dataset(files, filesystem=store.fs, format="parquet")
    for frag in d.get_fragments():
        check_version(frag.physical_schema, frag.path)
    t = d.to_table(columns=[*d.schema.names, "__filename"], filter=ds.field("neuron") == neuron)
    names = t["__filename"].to_pylist()
    t = t.drop_columns(["__filename"]).add_column(0, "layer", pa.array([layer] * t.num_rows, pa.int16()))
    t = t.append_column("shard", pa.array([_file_shard(p) for p in names], pa.string()))
    return _conform(t, table, cols)


def sequence_tokens(store: RunStore, seq_ids: list[int]) -> dict[int, list[str]]:
    """Token strings of the given windows, read from `sequences` (stored once, shared by every neuron)."""
    if not seq_ids or not store.exists("sequences"):
        return {}
    d = store.dataset("sequences")
    t = d.to_table(columns=["seq_id", "tokens"], filter=ds.field("seq_id").isin(sorted(set(seq_ids))))
    return dict(zip(t["seq_id"].to_pylist(), t["tokens"].to_pylist()))


def neuron_detail(store: RunStore, layer: int, neuron: int, shard: str | None = None) -> dict:
    """Everything stored about one neuron, with each record's tokens joined from `sequences`:
    {layer, neuron, ledger (latest row or None), stats, explanations (selected first), scores,
     records: {top, random, quantile: [{rank, seq_id, tokens, activations, max_activation}]},
     scored: {scorer: [{seq_id, kind, tokens, true, simulated, per_sequence}]}}.
    `shard` (the ledger's shard id, when the caller knows it) limits the reads to that shard's files."""
    ledger = _read_partition(store, "ledger", layer, neuron, shard)
    led = _latest_ledger(ledger).to_pylist()[0] if ledger.num_rows else None
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
    records: dict[str, list] = {"top": [], "random": [], "quantile": []}
    true_by_seq: dict[int, tuple[str, list]] = {}
    for r in sorted(recs, key=lambda r: (r["kind"], r["rank"])):
        records.setdefault(r["kind"], []).append({
            "rank": r["rank"], "seq_id": r["seq_id"], "tokens": tokens.get(r["seq_id"], []),
            "activations": r["activations"], "max_activation": r["max_activation"]})
        true_by_seq.setdefault(r["seq_id"], (r["kind"], r["activations"]))
    scored: dict[str, list] = {}
    for sc in scores:
        if not sc.get("simulated"):
            continue
        per = sc.get("per_sequence") or []
        scored[sc["scorer"]] = [{
            "seq_id": s, "kind": true_by_seq.get(s, ("?", None))[0], "tokens": tokens.get(s, []),
            "true": true_by_seq.get(s, ("?", []))[1], "simulated": sim,
            "per_sequence": per[i] if i < len(per) else None}
            for i, (s, sim) in enumerate(zip(sc["seq_ids"] or [], sc["simulated"]))]
    return {"layer": layer, "neuron": neuron, "ledger": led, "stats": stats[0] if stats else None,
            "explanations": expl_rows, "scores": scores, "records": records, "scored": scored}
