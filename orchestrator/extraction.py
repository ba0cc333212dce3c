"""The extraction stage against a run directory: corpus -> sequences/, actors -> records/ and neuron_stats/.

Steps, each resumable:
1. `sequences/part-NNNNN.parquet`: the corpus windows cut into chunks of `chunk_windows`, written once
   (`_extract/sequences.json` says they are all there).
2. Actors (Ray, or one in-process worker) each own a checkpoint slot `_extract/state/slot-NNN/`; after every
   finished chunk the slot's collector is saved and its `head.json` lists the chunks it covers. A rerun reads
   the heads, skips covered chunks, and hands out the rest.
3. Quantile records (`records.quantiles`) only: step 2 also saved every chunk's window maxima
   (`_extract/maxima/`); from their union the driver picks each neuron's quantile windows
   (`_extract/quantile/picks.pt`), then the actors re-run just the batches holding a picked window, cut as in
   step 2 so the activations are the same bit for bit, one `_extract/quantile/chunk-NNNNN/` per chunk.
4. The slots are merged layer by layer and written as `records/layer=L/nAAAAAA-BBBBBB.parquet` (one file per
   block of neurons, rows sorted by neuron, so reading one shard's neurons touches one file) and
   `neuron_stats/layer=L/all.parquet`.
5. `_extract/complete.json`, last. With it present a rerun does nothing.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from orchestrator.plan import EXTRACT_MARKER
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from workers.extract.corpus import TokenDecoder, iter_windows, sequences_table
from workers.extract.worker import (QUANTILE_PICKS, CollectorSpec, ExtractError, ExtractWorker, LayerCollector,
                             checkpoint_dir, load_layer_maxima, quantile_chunk_dir, quantile_picks, read_bytes,
                             read_head, sequences_part, tensor_bytes, tensor_load)

PLAN_FILE = "_extract/plan.json"
SEQUENCES_MANIFEST = "_extract/sequences.json"
DEFAULT_CHUNK_WINDOWS = 512
NEURONS_PER_FILE = 256
# settings that must match for a run directory's partial extraction to be continued
PLAN_KEYS = ("model", "layers", "n_neurons", "seq_len", "top_k", "n_random", "seed", "corpus", "max_windows",
             "chunk_windows", "quantiles", "n_per_quantile")
PLAN_DEFAULTS = {"quantiles": False, "n_per_quantile": 2}  # plans written before quantile records existed


@dataclass
class ExtractProgress:
    windows_done: int
    windows_total: int
    tokens_done: int
    tokens_per_s: float
    eta_s: float | None
    chunks_done: int
    chunks_total: int


@dataclass
class ExtractSummary:
    already_complete: bool
    model: str
    layers: list[int]
    n_neurons: int
    n_windows: int
    n_chunks: int = 0
    chunks_processed: int = 0
    chunks_resumed: int = 0
    seconds: float = 0.0
    tokens_per_s: float = 0.0
    marker: dict = field(default_factory=dict)


def run_extraction(cfg: SweepConfig, store: RunStore, *, n_actors: int | None = None, progress=None,
                   metrics=None, chunk_windows: int | None = None, use_ray: bool = True,
                   compile: bool | None = None) -> ExtractSummary:
    """Run (or continue, or skip when complete) the extraction stage of `cfg` into `store`.

    `progress`: a callable taking `ExtractProgress`, or a rich `Progress` (a task is added to it).
    `use_ray=False` runs one worker in this process (no cluster; tests, small runs). `compile`: fuse the
    per-window reductions with torch.compile (None: for GPUs and real-sized models, see `wants_compile`)."""
    from workers.models.loading import model_info

    if store.exists(EXTRACT_MARKER):
        m = store.read_json(EXTRACT_MARKER)
        return ExtractSummary(True, (m.get("model") or {}).get("name", ""), m.get("layers", []),
                              m.get("n_neurons", 0), m.get("n_windows", 0), m.get("n_chunks", 0), marker=m)
    t0 = time.monotonic()
    info = model_info(cfg.model.name)
    cfg.check_against_model(info.n_layers, info.n_neurons, info.max_positions)
    layers = cfg.layer_list(info.n_layers)
    plan = checked_plan(cfg, store, info, layers, chunk_windows or DEFAULT_CHUNK_WINDOWS)
    manifest = write_sequences(cfg, store, plan["chunk_windows"])
    n_chunks, n_windows = manifest["n_chunks"], manifest["n_windows"]
    quantiles = cfg.records.quantiles
    spec = CollectorSpec(layers, info.n_neurons, cfg.corpus.seq_len, cfg.records.top_k, cfg.records.n_random,
                         cfg.seed, corpus=range(n_windows),  # write_sequences numbers the windows 0..n-1
                         keep_maxima=quantiles)
    heads = slot_heads(store)
    done = {c for h in heads.values() for c in h["done_chunks"]}
    todo = [c for c in range(n_chunks) if c not in done]
    tracker = ProgressTracker(progress, metrics, n_windows, n_chunks, manifest["chunk_windows"],
                              cfg.corpus.seq_len, done)
    pool = (RayPool if use_ray else LocalPool)(cfg, store, spec, n_actors=n_actors, compile=compile)
    try:
        if todo:
            pool.map("process", todo, lambda r, slot: tracker.chunk_done(r.windows, r.tokens, slot, r.seconds))
        tracker.close()
        if quantiles:
            check_coverage(slot_heads(store), n_chunks)
            picks = planned_quantile_picks(store, spec, n_chunks, cfg.records.n_per_quantile)
            qtodo = [c for c in quantile_chunks(picks, manifest["chunk_windows"])
                     if not store.exists(f"{quantile_chunk_dir(c)}/done.json")]
            if qtodo:
                pool.map("process_quantiles", qtodo, lambda r, slot: None)
    finally:
        pool.close()
    write_outputs(store, spec, slot_heads(store), n_chunks)
    marker = {"model": {"name": info.name, "architecture": info.architecture, "n_layers": info.n_layers,
                        "n_neurons": info.n_neurons},
              "layers": layers, "n_neurons": info.n_neurons, "n_windows": n_windows, "n_chunks": n_chunks,
              "seq_len": cfg.corpus.seq_len, "top_k": cfg.records.top_k, "n_random": cfg.records.n_random,
              "seed": cfg.seed, "corpus": cfg.corpus.source, "neurons_per_file": NEURONS_PER_FILE,
              "quantiles": quantiles, "n_per_quantile": cfg.records.n_per_quantile if quantiles else 0,
              "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_json(EXTRACT_MARKER, marker)
    seconds = time.monotonic() - t0
    return ExtractSummary(False, info.name, layers, info.n_neurons, n_windows, n_chunks, len(todo),
                          len(done), seconds, tracker.tokens_per_s, marker)


# --- plan and sequences --------------------------------------------------------------------------------------
def checked_plan(cfg: SweepConfig, store: RunStore, info, layers: list[int], chunk_windows: int) -> dict:
    plan = {"model": info.name, "layers": layers, "n_neurons": info.n_neurons, "seq_len": cfg.corpus.seq_len,
            "top_k": cfg.records.top_k, "n_random": cfg.records.n_random, "seed": cfg.seed,
            "corpus": cfg.corpus.source, "max_windows": cfg.corpus.max_windows, "chunk_windows": chunk_windows,
            "quantiles": cfg.records.quantiles, "n_per_quantile": cfg.records.n_per_quantile}
    if store.exists(PLAN_FILE):
        old = {**PLAN_DEFAULTS, **store.read_json(PLAN_FILE)}
        if not plan["quantiles"]:  # n_per_quantile is unused then
            old["n_per_quantile"] = plan["n_per_quantile"] = PLAN_DEFAULTS["n_per_quantile"]
        diff = [k for k in PLAN_KEYS if k != "chunk_windows" and old.get(k) != plan[k]]
        if diff:
            raise ExtractError(
                f"{store.root} holds a partial extraction with other settings ({', '.join(diff)}: "
                f"{', '.join(f'{old.get(k)!r} there, {plan[k]!r} now' for k in diff)}); use a new --out")
        return old  # the chunking of a started run is kept, whatever chunk size is asked now
    store.write_json(PLAN_FILE, plan)
    return plan


def load_tokenizer(name: str):
    from workers.models.loading import resolve_model_path, tiny_tokenizer

    if name.startswith("tiny-"):
        return tiny_tokenizer()
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name))


def write_sequences(cfg: SweepConfig, store: RunStore, chunk_windows: int) -> dict:
    """Cut the corpus into windows, write one sequences part per chunk (skipping parts already there)."""
    if store.exists(SEQUENCES_MANIFEST):
        return store.read_json(SEQUENCES_MANIFEST)
    tokenizer = load_tokenizer(cfg.model.name)
    decoder = TokenDecoder(tokenizer)
    n_windows, chunk, buf = 0, 0, []

    def flush():
        nonlocal chunk, buf
        if buf:
            if not store.exists(f"sequences/{sequences_part(chunk)}.parquet"):
                store.write_table("sequences", sequences_table(buf, decoder), sequences_part(chunk))
            chunk, buf = chunk + 1, []

    for w in iter_windows(cfg.corpus, tokenizer):
        buf.append(w)
        n_windows += 1
        if len(buf) == chunk_windows:
            flush()
    flush()
    manifest = {"n_windows": n_windows, "n_chunks": chunk, "chunk_windows": chunk_windows,
                "seq_len": cfg.corpus.seq_len}
    store.write_json(SEQUENCES_MANIFEST, manifest)
    return manifest


def slot_heads(store: RunStore) -> dict[int, dict]:
    """Every checkpoint slot's head document: which chunks its saved collector covers."""
    heads = {}
    for path in store.list_files("_extract/state"):
        if path.endswith("/head.json"):
            slot = int(path.rsplit("/", 2)[-2].removeprefix("slot-"))
            heads[slot] = read_head(store, slot)
    return heads


# --- running the chunks ---------------------------------------------------------------------------------------
class ProgressTracker:
    """Windows done, tokens/s and ETA, sent to a callback or a rich Progress, and to the metrics."""

    def __init__(self, progress, metrics, n_windows: int, n_chunks: int, chunk_windows: int, seq_len: int,
                 done: set[int]):
        self.progress, self.metrics = progress, metrics
        self.n_windows, self.n_chunks, self.seq_len = n_windows, n_chunks, seq_len
        last = n_windows - (n_chunks - 1) * chunk_windows
        self.windows_done = sum(last if c == n_chunks - 1 else chunk_windows for c in done)
        self.chunks_done = len(done)
        self.tokens_new, self.t0 = 0, time.monotonic()
        self.task = None
        if progress is not None and hasattr(progress, "add_task"):
            self.task = progress.add_task("extract windows", total=n_windows, completed=self.windows_done,
                                          rate="")
        self.report()

    @property
    def tokens_per_s(self) -> float:
        dt = time.monotonic() - self.t0
        return self.tokens_new / dt if dt > 0 and self.tokens_new else 0.0

    def chunk_done(self, windows: int, tokens: int, slot: int, seconds: float) -> None:
        self.windows_done += windows
        self.chunks_done += 1
        self.tokens_new += tokens
        if self.metrics is not None:
            self.metrics.extract_tokens.inc(tokens)
            if seconds > 0:
                self.metrics.extract_rate.labels(str(slot)).set(tokens / seconds)
        self.report()

    def report(self) -> None:
        rate = self.tokens_per_s
        left = (self.n_windows - self.windows_done) * self.seq_len
        eta = left / rate if rate else None
        if self.task is not None:
            self.progress.update(self.task, completed=self.windows_done,
                                 rate=f"{rate:,.0f} tokens/s" if rate else "")
        elif callable(self.progress):
            self.progress(ExtractProgress(self.windows_done, self.n_windows, self.tokens_new, rate, eta,
                                          self.chunks_done, self.n_chunks))

    def close(self) -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=self.windows_done)


def _first_free_slot(store: RunStore) -> int:
    heads = slot_heads(store)
    return min(heads) if heads else 0


class LocalPool:
    """One in-process worker (created on first use) that runs chunk tasks: `map("process", chunks, on_result)`."""

    def __init__(self, cfg, store, spec, *, n_actors=None, compile=None):
        self.cfg, self.store, self.spec, self.compile = cfg, store, spec, compile
        self.worker: ExtractWorker | None = None

    def map(self, method: str, chunks: list[int], on_result: Callable) -> None:
        if self.worker is None:
            cfg = self.cfg
            self.worker = ExtractWorker(cfg.model.name, self.spec, self.store, _first_free_slot(self.store),
                                        batch_size=cfg.model.batch_size, dtype=cfg.model.dtype,
                                        device=cfg.model.device, compile=self.compile)
        for chunk in chunks:
            on_result(getattr(self.worker, method)(chunk), self.worker.slot)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.extractor.close()


class RayPool:
    """Extraction actors (started on first use, kept for every later stage), one checkpoint slot each; chunks
    go to whichever actor is free."""

    def __init__(self, cfg, store, spec, *, n_actors=None, compile=None):
        self.cfg, self.store, self.spec, self.n_actors, self.compile = cfg, store, spec, n_actors, compile
        self.actors: list | None = None
        self.started_ray = False

    def _start(self, n_tasks: int) -> None:
        import ray

        from workers.extract.actor import ExtractActor, actor_options

        cfg = self.cfg
        if not ray.is_initialized():
            kw = dict(address=cfg.ray_address) if cfg.ray_address else dict(include_dashboard=False)
            ray.init(log_to_driver=False, **kw)
            self.started_ray = True
        gpus = ray.cluster_resources().get("GPU", 0)
        n = max(1, min(self.n_actors or (int(gpus) or 1), n_tasks))
        self.actors = [ExtractActor.options(**actor_options(gpus)).remote(
            cfg.model.name, self.spec, self.store, slot, cfg.model.batch_size, cfg.model.dtype, cfg.model.device,
            self.compile) for slot in range(n)]

    def map(self, method: str, chunks: list[int], on_result: Callable) -> None:
        import ray

        if self.actors is None:
            self._start(len(chunks))
        queue = list(chunks)
        inflight = {}
        for slot, actor in enumerate(self.actors):
            if queue:
                inflight[getattr(actor, method).remote(queue.pop(0))] = slot
        while inflight:
            ready, _ = ray.wait(list(inflight), num_returns=1)
            slot = inflight.pop(ready[0])
            on_result(ray.get(ready[0]), slot)
            if queue:
                inflight[getattr(self.actors[slot], method).remote(queue.pop(0))] = slot

    def close(self) -> None:
        import ray

        for a in self.actors or []:
            ray.kill(a, no_restart=True)
        if self.started_ray:
            ray.shutdown()


# --- quantile records ------------------------------------------------------------------------------------------
def planned_quantile_picks(store: RunStore, spec: CollectorSpec, n_chunks: int, n_per_quantile: int) -> dict:
    """Every layer's quantile picks [N, bins * n_per_quantile] from the window maxima of all chunks, computed
    once and saved (`QUANTILE_PICKS`), so the quantile pass and a resumed run see the same picks."""
    if store.exists(QUANTILE_PICKS):
        return tensor_load(read_bytes(store, QUANTILE_PICKS))["picks"]
    picks = {}
    for layer in spec.layers:
        seq, maxima = load_layer_maxima(store, layer, range(n_chunks))
        picks[layer] = quantile_picks(spec.seed, layer, seq, maxima, n_per_quantile)
    store.write_bytes(QUANTILE_PICKS, tensor_bytes({"picks": picks, "n_per_quantile": n_per_quantile}))
    return picks


def quantile_chunks(picks: dict, chunk_windows: int) -> list[int]:
    """The chunks holding at least one picked window (window seq_id s lies in chunk s // chunk_windows)."""
    import torch

    seq = torch.cat([p.reshape(-1) for p in picks.values()])
    return sorted(set((seq[seq >= 0] // chunk_windows).tolist()))


def quantile_rows(store: RunStore, layer: int, chunks: list[int], picks) -> dict:
    """One layer's quantile rows from the quantile pass's chunk files, sorted by neuron then rank."""
    import numpy as np
    import torch

    parts = [tensor_load(read_bytes(store, f"{quantile_chunk_dir(c)}/layer-{layer:03d}.pt")) for c in chunks]
    cols = {k: torch.cat([p[k] for p in parts]).numpy() for k in ("neuron", "rank", "seq_id", "acts")}
    if len(cols["neuron"]) != int((picks >= 0).sum()):
        raise ExtractError(f"layer {layer}: the quantile pass found {len(cols['neuron'])} of "
                           f"{int((picks >= 0).sum())} picked windows")
    order = np.lexsort((cols["rank"], cols["neuron"]))
    return {k: v[order] for k, v in cols.items()}


# --- merging and writing ------------------------------------------------------------------------------------
def merged_layer(store: RunStore, spec: CollectorSpec, heads: dict[int, dict], layer: int) -> LayerCollector:
    import torch

    merged = LayerCollector(layer, spec, torch.float32, "cpu")
    for slot, head in sorted(heads.items()):
        part = LayerCollector(layer, spec, torch.float32, "cpu")
        part.load_state_dict(tensor_load(read_bytes(store, f"{checkpoint_dir(slot)}/gen-{head['gen']}/"
                                                           f"layer-{layer}.pt")))
        merged.merge(part)
    return merged


def records_file(start: int, end: int) -> str:
    return f"n{start:06d}-{end:06d}"


def check_coverage(heads: dict[int, dict], n_chunks: int) -> None:
    covered = sorted(c for h in heads.values() for c in h["done_chunks"])
    if covered != list(range(n_chunks)):
        raise ExtractError(f"extraction checkpoints cover {len(set(covered))} of {n_chunks} chunks "
                           f"(or some twice); rerun to finish")


def write_outputs(store: RunStore, spec: CollectorSpec, heads: dict[int, dict], n_chunks: int) -> None:
    check_coverage(heads, n_chunks)
    picks = tensor_load(read_bytes(store, QUANTILE_PICKS))["picks"] if spec.keep_maxima else None
    if picks is not None:
        chunk_windows = store.read_json(SEQUENCES_MANIFEST)["chunk_windows"]
        q_chunks = quantile_chunks(picks, chunk_windows)
    for layer in spec.layers:
        c = merged_layer(store, spec, heads, layer)
        extra = quantile_rows(store, layer, q_chunks, picks[layer]) if picks is not None else None
        records = c.records_table(extra)
        for start in range(0, spec.n_neurons, NEURONS_PER_FILE):
            end = min(start + NEURONS_PER_FILE, spec.n_neurons)
            part = records.filter(pc.and_(pc.greater_equal(records["neuron"], start),
                                          pc.less(records["neuron"], end)))
            store.write_table("records", part, records_file(start, end), layer=layer)
        store.write_table("neuron_stats", c.stats_table(), "all", layer=layer)


def read_records(store: RunStore, layer: int, neuron_start: int, neuron_end: int,
                 columns: list[str] | None = None) -> pa.Table:
    """Records of neurons [neuron_start, neuron_end) of one layer, opening only the files that hold them.
    Rows come sorted by neuron, kind (top, random, quantile) and rank; the `layer` column is not included."""
    paths = []
    for path in store.list_files(f"records/layer={layer}"):
        name = path.rsplit("/", 1)[-1]
        if name.startswith(("_", ".")) or not name.endswith(".parquet"):
            continue
        lo, hi = (int(x) for x in name.removesuffix(".parquet").removeprefix("n").split("-"))
        if lo < neuron_end and hi > neuron_start:
            paths.append(path)
    if not paths:
        return ds.dataset([], schema=_records_file_schema()).to_table(columns=columns)
    d = ds.dataset(sorted(paths), format="parquet", filesystem=store.fs)
    flt = (pc.field("neuron") >= neuron_start) & (pc.field("neuron") < neuron_end)
    return d.to_table(columns=columns, filter=flt)


def _records_file_schema() -> pa.Schema:
    from schemas.tables import RECORDS

    return pa.schema([f for f in RECORDS if f.name != "layer"], metadata=RECORDS.metadata)

