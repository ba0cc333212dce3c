"""The extraction worker: owns one subject model and one collector, turns corpus chunks of the run's
`sequences` table into collector updates, and checkpoints after each chunk; for quantile records it then
re-runs the batches holding picked windows. No Ray here: actor.py wraps it in a Ray actor, and the driver
(orchestrator/extraction/) hands out the chunks.

The pieces it puts together: keys.py (seeded hashes, sort keys), capture.py (per-window reductions and the
fused compiled capture), collectors.py (reservoirs and collectors, with sketch.py's quantile sketch),
forward.py (hooking the model, the batch forward) and checkpoint.py (its state in the run store).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from schemas.layout import QUANTILE_PICKS, quantile_chunk_done, quantile_chunk_layer_file, sequences_part, table_file
from workers.extract.capture import compiled_summaries, window_summaries
from workers.extract.checkpoint import (
    WorkerStore,
    load_collector,
    read_bytes,
    save_collector,
    tensor_bytes,
    tensor_load,
)
from workers.extract.collectors import ActivationCollector, CollectorSpec, LayerCapture
from workers.extract.forward import ActivationExtractor
from workers.units.source import worker_units

if TYPE_CHECKING:
    from workers.models.loading import LoadedModel


def wants_compile(spec: CollectorSpec, device) -> bool:
    """Fuse the per-window reductions with torch.compile where it pays: a GPU, or a real-sized model on a CPU
    (the compile takes seconds; the tiny test models run eagerly)."""
    return torch.device(device).type == "cuda" or spec.n_neurons * len(spec.layers) >= 8192


def read_chunk(store: WorkerStore, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [n, T], seq ids [n]) of one corpus chunk, from the run's sequences table."""
    import pyarrow.parquet as pq

    with store.fs.open_input_file(store.path(table_file("sequences", sequences_part(chunk)))) as f:
        t = pq.read_table(f, columns=["seq_id", "token_ids"])
    seq_ids = torch.from_numpy(t.column("seq_id").to_numpy().astype(np.int64))
    flat = t.column("token_ids").combine_chunks().flatten().to_numpy().astype(np.int64)
    return torch.from_numpy(flat.reshape(len(seq_ids), -1)), seq_ids


def picks_in_chunk(picks: torch.Tensor, seq_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[N, R] picked seq ids (-1: none) and a chunk's [w] seq ids -> (neuron, rank, seq_id, position in the
    chunk) of every pick that falls in the chunk."""
    hit = torch.isin(picks, seq_ids)
    neuron, rank = hit.nonzero(as_tuple=True)
    seq = picks[neuron, rank]
    by_seq, perm = seq_ids.sort()
    return neuron, rank, seq, perm[torch.searchsorted(by_seq, seq)]


@dataclass
class ChunkResult:
    chunk: int
    windows: int
    tokens: int
    seconds: float
    skipped: bool = False


@dataclass
class ExtractWorker:
    """Owns one subject model and one collector; processes chunks and checkpoints after each.

    A restarted worker (same slot) reloads its checkpoint, and a chunk it already covers is skipped, so
    at-least-once delivery of `process` calls still counts every window exactly once."""
    model_name: str
    spec: CollectorSpec
    store: WorkerStore
    slot: int
    batch_size: int = 32
    dtype: str = "auto"
    device: str = "auto"
    compile: bool | None = None  # None: `wants_compile`
    loaded: LoadedModel | None = field(default=None, repr=False)  # None: loaded by __post_init__
    _picks: dict | None = field(default=None, init=False, repr=False)
    _captures: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        from workers.models.loading import load_subject

        if self.loaded is None:
            self.loaded = load_subject(self.model_name, dtype=self.dtype, device=self.device)
        param = next(self.loaded.model.parameters())
        if self.compile is None:
            self.compile = wants_compile(self.spec, param.device)
        summarize = compiled_summaries() if self.compile else window_summaries
        self.collector = ActivationCollector(self.spec, dtype=param.dtype, device=param.device, summarize=summarize)
        load_collector(self.store, self.slot, self.collector)
        self.units = worker_units(self.spec.units, self.loaded)  # None: MLP neurons
        self.extractor = ActivationExtractor(self.loaded, self.collector, self.compile, self._captures, self.units)

    def done_chunks(self) -> list[int]:
        return sorted(self.collector.done_chunks)

    def process(self, chunk: int) -> ChunkResult:
        if chunk in self.collector.done_chunks:
            return ChunkResult(chunk, 0, 0, 0.0, skipped=True)
        t0 = time.perf_counter()
        token_ids, seq_ids = read_chunk(self.store, chunk)
        self.extractor.run(token_ids, seq_ids, self.batch_size)
        self.collector.done_chunks.add(chunk)
        save_collector(self.store, self.slot, self.collector)
        return ChunkResult(chunk, len(seq_ids), token_ids.numel(), time.perf_counter() - t0)

    def process_quantiles(self, chunk: int) -> ChunkResult:
        """The quantile pass over one chunk: re-run only the batches holding a picked window (`QUANTILE_PICKS`),
        cut exactly as in the first pass, so the activations equal the first pass's bit for bit; write the
        picked windows' activations per layer, then `done.json`."""
        if self.store.exists(quantile_chunk_done(chunk)):
            return ChunkResult(chunk, 0, 0, 0.0, skipped=True)
        t0 = time.perf_counter()
        if self._picks is None:
            self._picks = tensor_load(read_bytes(self.store, QUANTILE_PICKS))["picks"]
        token_ids, seq_ids = read_chunk(self.store, chunk)
        wanted = {layer: picks_in_chunk(p, seq_ids) for layer, p in self._picks.items()}
        acts = {layer: torch.zeros(len(w[0]), self.spec.seq_len) for layer, w in wanted.items()}
        bs = self.batch_size
        batches = sorted({int(b) for w in wanted.values() for b in (w[3] // bs).tolist()})
        # the first pass's computation (same fused or hooked path, same compiled functions), so bit-equal output
        assert self.loaded is not None and self.compile is not None  # both set by __post_init__
        capture = LayerCapture(self._picks, self.spec.n_neurons, next(self.loaded.model.parameters()).device,
                               bottom=self.spec.bottom_k > 0)
        extractor = ActivationExtractor(self.loaded, capture, self.compile, self._captures, self.units)
        try:
            for b in batches:
                lo = b * bs
                extractor.run_batch(token_ids[lo:lo + bs], seq_ids[lo:lo + bs])
                for layer, (neuron, _, _, pos) in wanted.items():
                    sel = (pos // bs == b).nonzero(as_tuple=True)[0]
                    x = capture.acts[layer]
                    acts[layer][sel] = x[(pos[sel] - lo).to(x.device), :, neuron[sel].to(x.device)].float().cpu()
        finally:
            extractor.close()
        for layer, (neuron, rank, seq, _) in wanted.items():
            self.store.write_bytes(quantile_chunk_layer_file(chunk, layer), tensor_bytes(
                {"neuron": neuron, "rank": rank, "seq_id": seq, "acts": acts[layer]}))
        windows = sum(len(seq_ids[b * bs:(b + 1) * bs]) for b in batches)
        self.store.write_json(quantile_chunk_done(chunk), {"windows_rerun": windows})
        return ChunkResult(chunk, windows, windows * self.spec.seq_len, time.perf_counter() - t0)

