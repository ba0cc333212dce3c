"""Step 4 of extraction, the stage's outputs: every checkpoint slot merged layer by layer into the `records`
(one file per block of `NEURONS_PER_FILE` neurons) and `neuron_stats` tables, and `read_records`, which reads
one shard's neurons back opening only the files that hold them."""
from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from orchestrator.extraction.quantiles import quantile_chunks, quantile_rows, rows_by_kind
from orchestrator.store import RunStore
from schemas.layout import (
    HIDDEN_PREFIXES,
    QUANTILE_PICKS,
    SEQUENCES_MANIFEST,
    STATS_FILE,
    partition_dir,
    records_file,
    records_file_range,
)
from schemas.tables import RECORDS
from workers.extract.checkpoint import load_layer_state, read_bytes, tensor_load
from workers.extract.collectors import CollectorSpec, LayerCollector
from workers.extract.errors import ExtractError

NEURONS_PER_FILE = 256


def merged_layer(store: RunStore, spec: CollectorSpec, heads: dict[int, dict], layer: int) -> LayerCollector:
    import torch

    merged = LayerCollector(layer, spec, torch.float32, "cpu")
    for slot, head in sorted(heads.items()):
        part = LayerCollector(layer, spec, torch.float32, "cpu")
        part.load_state_dict(load_layer_state(store, slot, head["gen"], layer))
        merged.merge(part)
    return merged


def check_coverage(heads: dict[int, dict], n_chunks: int) -> None:
    covered = sorted(c for h in heads.values() for c in h["done_chunks"])
    if covered != list(range(n_chunks)):
        raise ExtractError(f"extraction checkpoints cover {len(set(covered))} of {n_chunks} chunks "
                           f"(or some twice); rerun to finish")


def write_outputs(store: RunStore, spec: CollectorSpec, heads: dict[int, dict], n_chunks: int) -> None:
    check_coverage(heads, n_chunks)
    saved = tensor_load(read_bytes(store, QUANTILE_PICKS)) if spec.sketch_per_bucket else None
    picks = saved["picks"] if saved is not None else None
    if picks is not None:
        chunk_windows = store.read_json(SEQUENCES_MANIFEST)["chunk_windows"]
        q_chunks = quantile_chunks(picks, chunk_windows)
    for layer in spec.layers:
        c = merged_layer(store, spec, heads, layer)
        extras = None
        if saved is not None:  # quantile records and/or classifier windows
            layer_picks = saved["picks"][layer]
            extras = rows_by_kind(quantile_rows(store, layer, q_chunks, layer_picks),
                                  saved.get("kinds") or [("quantile", layer_picks.shape[1])])
        records = c.records_table(extras)
        for start in range(0, spec.n_neurons, NEURONS_PER_FILE):
            end = min(start + NEURONS_PER_FILE, spec.n_neurons)
            part = records.filter(pc.and_(pc.greater_equal(records["neuron"], start),
                                          pc.less(records["neuron"], end)))
            store.write_table("records", part, records_file(start, end), layer=layer)
        store.write_table("neuron_stats", c.stats_table(), STATS_FILE, layer=layer)


def read_records(store: RunStore, layer: int, neuron_start: int, neuron_end: int,
                 columns: list[str] | None = None) -> pa.Table:
    """Records of neurons [neuron_start, neuron_end) of one layer, opening only the files that hold them.
    Rows come sorted by neuron, kind (top, bottom, random, quantile, stratified, non_activating) and rank; the
    `layer` column is not included."""
    paths = []
    for path in store.list_files(partition_dir("records", layer)):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(HIDDEN_PREFIXES) or not name.endswith(".parquet"):
            continue
        lo, hi = records_file_range(name)
        if lo < neuron_end and hi > neuron_start:
            paths.append(path)
    if not paths:
        return ds.dataset([], schema=_records_file_schema()).to_table(columns=columns)
    d = ds.dataset(sorted(paths), format="parquet", filesystem=store.fs)
    flt = (pc.field("neuron") >= neuron_start) & (pc.field("neuron") < neuron_end)
    return d.to_table(columns=columns, filter=flt)


def _records_file_schema() -> pa.Schema:
    return pa.schema([f for f in RECORDS if f.name != "layer"], metadata=RECORDS.metadata)
