"""Every path inside a run directory, built in one place (relative to the run's root, `/`-separated, so the same
names serve a local folder and an object store).

    run.json                                    resolved config, plan, versions (RUN_FILE)
    _lease.json                                 the driver working on the run now (LEASE_FILE)
    sequences/part-NNNNN.parquet                corpus windows, stored once (sequences_part)
    records/layer=L/nAAAAAA-BBBBBB.parquet      per-neuron top / bottom / random / quantile records (records_file)
    neuron_stats/layer=L/all.parquet
    explanations|scores|ledger/layer=L/shard-<id>.parquet    a shard's first commit; its k-th (a retry of its
                                                failed neurons) writes shard-<id>.v<k>.parquet beside it
    calls/shard-<id>[.v<k>].parquet             the journal rows of the calls a committed shard made
    _markers/<id>.json                          written last: the shard is committed; lists its files (shard_marker)
    _journal/calls.sqlite                       the call journal of a local run (JOURNAL_FILE)
    _extract/plan.json, sequences.json          the extraction's pinned settings and corpus manifest
    _extract/state/slot-NNN/head.json           a checkpoint slot's head; gen-G/layer-L.pt its collector state
    _extract/quantile/picks.pt, chunk-NNNNN/    the quantile pass's picks and per-chunk output
    _extract/complete.json                      written last: extraction is done (EXTRACT_MARKER)

Names starting with `_` or `.` are never read as table data (pyarrow's default, and `is_hidden`), so
bookkeeping and half-written files stay out of every table.
"""
from __future__ import annotations

RUN_FILE = "run.json"

# --- tables ---------------------------------------------------------------------------------------------------
PARTITIONED = frozenset({"records", "neuron_stats", "explanations", "scores", "ledger"})  # by layer (hive style)
SHARD_TABLES = ("explanations", "scores", "ledger", "calls")  # written by shard commits: read only when committed
SHARD_FILE_PREFIX = "shard-"
COMMIT_SEPARATOR = ".v"  # shard-<id>.v<k>: a shard's k-th commit (shard ids hold no '.')
IMPORTED = "imported"  # the model name and shard id of rows imported from another tool (or synthetic)
STATS_FILE = "all"  # the one neuron_stats file of a layer
HIDDEN_PREFIXES = ("_", ".")
TMP_PREFIX = "_tmp-"  # a file being written; hidden until renamed


def partition_dir(table: str, layer: int) -> str:
    return f"{table}/layer={layer}"


def table_file(table: str, name: str, layer: int | None = None) -> str:
    """The published file `name` of `table` (in its layer's folder when the table is partitioned)."""
    if table in PARTITIONED:
        if layer is None:
            raise ValueError(f"table {table} is partitioned by layer; a layer is needed")
        return f"{partition_dir(table, layer)}/{name}.parquet"
    return f"{table}/{name}.parquet"


def shard_file_name(shard_id: str, commit: int = 1) -> str:
    """A shard's file name (without `.parquet`) in explanations, scores, ledger and calls, for its `commit`-th
    commit: every commit writes new names, so one that crashes leaves the files its marker lists intact."""
    return f"{SHARD_FILE_PREFIX}{shard_id}" + (f"{COMMIT_SEPARATOR}{commit}" if commit != 1 else "")


def shard_of_file(path: str) -> str:
    """The shard id of a table file path (the inverse of `shard_file_name`)."""
    stem = path.rsplit("/", 1)[-1].removesuffix(".parquet").removeprefix(SHARD_FILE_PREFIX)
    return stem.split(COMMIT_SEPARATOR, 1)[0]


def is_hidden(rel: str) -> bool:
    """Whether any part of a relative path is bookkeeping or a file being written (never table data)."""
    return any(p.startswith(HIDDEN_PREFIXES) for p in rel.split("/") if p)


def sequences_part(chunk: int) -> str:
    """The sequences file name (without `.parquet`) of one corpus chunk."""
    return f"part-{chunk:05d}"


def records_file(start: int, end: int) -> str:
    """The records file name (without `.parquet`) holding neurons [start, end) of a layer."""
    return f"n{start:06d}-{end:06d}"


def records_file_range(name: str) -> tuple[int, int]:
    """(start, end) of a records file name or path, the inverse of `records_file`."""
    stem = name.rsplit("/", 1)[-1].removesuffix(".parquet")
    lo, _, hi = stem.removeprefix("n").partition("-")
    return int(lo), int(hi)


# --- shard commits ----------------------------------------------------------------------------------------------
MARKERS_DIR = "_markers"


def shard_marker(shard_id: str) -> str:
    return f"{MARKERS_DIR}/{shard_id}.json"


def marker_shard_id(path: str) -> str | None:
    """The shard id of a marker path, or None for anything else in the markers folder (temporary files)."""
    name = path.rsplit("/", 1)[-1]
    if not name.endswith(".json") or name.startswith(HIDDEN_PREFIXES):
        return None
    return name.removesuffix(".json")


# --- the run lease (orchestrator/lease.py) -----------------------------------------------------------------------
LEASE_FILE = "_lease.json"  # owner, host, pid and heartbeat of the one driver working on the run
LEASE_GUARD = "_lease.guard"  # local disks only: locked (flock) for the moment a lease is created, renewed or taken


# --- the call journal -------------------------------------------------------------------------------------------
JOURNAL_FILE = "_journal/calls.sqlite"

# --- extraction ---------------------------------------------------------------------------------------------------
EXTRACT_DIR = "_extract"
EXTRACT_MARKER = f"{EXTRACT_DIR}/complete.json"
EXTRACT_PLAN = f"{EXTRACT_DIR}/plan.json"
SEQUENCES_MANIFEST = f"{EXTRACT_DIR}/sequences.json"
CHECKPOINTS_DIR = f"{EXTRACT_DIR}/state"
QUANTILE_PICKS = f"{EXTRACT_DIR}/quantile/picks.pt"


def checkpoint_dir(slot: int) -> str:
    return f"{CHECKPOINTS_DIR}/slot-{slot:03d}"


def checkpoint_head(slot: int) -> str:
    """The slot's head document: which generation holds its state and which chunks that covers."""
    return f"{checkpoint_dir(slot)}/head.json"


def checkpoint_head_slot(path: str) -> int:
    """The slot of a head document's path (the inverse of `checkpoint_head`)."""
    return int(path.rsplit("/", 2)[-2].removeprefix("slot-"))


def checkpoint_gen_dir(slot: int, gen: int) -> str:
    return f"{checkpoint_dir(slot)}/gen-{gen}"


def checkpoint_layer_file(slot: int, gen: int, layer: int) -> str:
    return f"{checkpoint_gen_dir(slot, gen)}/layer-{layer}.pt"


def quantile_chunk_dir(chunk: int) -> str:
    """The quantile pass's output for one chunk: layer-LLL.pt rows, then done.json."""
    return f"{EXTRACT_DIR}/quantile/chunk-{chunk:05d}"


def quantile_chunk_done(chunk: int) -> str:
    return f"{quantile_chunk_dir(chunk)}/done.json"


def quantile_chunk_layer_file(chunk: int, layer: int) -> str:
    return f"{quantile_chunk_dir(chunk)}/layer-{layer:03d}.pt"
