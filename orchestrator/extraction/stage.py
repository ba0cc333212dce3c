"""`run_extraction`: the extraction stage end to end (the steps of the package docstring, in order), and what
it reports."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from orchestrator.extraction.outputs import NEURONS_PER_FILE, check_coverage, write_outputs
from orchestrator.extraction.plan import DEFAULT_CHUNK_WINDOWS, checked_plan, write_sequences
from orchestrator.extraction.pools import LocalPool, RayPool
from orchestrator.extraction.progress import ProgressTracker
from orchestrator.extraction.quantiles import planned_quantile_picks, quantile_chunks
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.layout import EXTRACT_MARKER, quantile_chunk_done
from workers.extract.checkpoint import slot_heads
from workers.extract.collectors import CollectorSpec


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

    t0 = time.monotonic()
    model = info = model_info(cfg.model.name)
    units = None  # SAE/transcoder latents or directions (workers/units/): their width is the units per layer
    if cfg.units.kind != "mlp_neuron":
        from dataclasses import replace

        from workers.units.source import unit_shape

        units = unit_shape(cfg, info.n_layers)
        info = replace(info, n_neurons=units["n_neurons"])
    cfg.check_against_model(info.n_layers, info.n_neurons, info.max_positions)
    layers = units["unit_layers"] if units else cfg.layer_list(info.n_layers)
    unit_source = units["units"] if units else None
    if store.exists(EXTRACT_MARKER):
        # a finished extraction stands only for the settings it ran with (model, layers, windows, records, the
        # dictionary's weights): the same check as a partial one's, before it is reused
        checked_plan(cfg, store, info, layers, chunk_windows or DEFAULT_CHUNK_WINDOWS, unit_source, complete=True)
        m = store.read_json(EXTRACT_MARKER)
        return ExtractSummary(True, (m.get("model") or {}).get("name", ""), m.get("layers", []),
                              m.get("n_neurons", 0), m.get("n_windows", 0), m.get("n_chunks", 0), marker=m)
    plan = checked_plan(cfg, store, info, layers, chunk_windows or DEFAULT_CHUNK_WINDOWS, unit_source)
    manifest = write_sequences(cfg, store, plan["chunk_windows"])
    n_chunks, n_windows = manifest["n_chunks"], manifest["n_windows"]
    quantiles = cfg.records.quantiles
    spec = CollectorSpec(layers, info.n_neurons, cfg.corpus.seq_len, cfg.records.top_k, cfg.records.n_random,
                         cfg.seed, corpus=range(n_windows),  # write_sequences numbers the windows 0..n-1
                         bottom_k=plan["bottom_k"], n_per_quantile=cfg.records.n_per_quantile if quantiles else 0,
                         units=plan.get("units"), **(plan.get("classifier") or {}))
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
        if spec.sketch_per_bucket:  # quantile records or classifier windows
            heads = slot_heads(store)
            check_coverage(heads, n_chunks)
            picks = planned_quantile_picks(store, spec, heads)
            qtodo = [c for c in quantile_chunks(picks, manifest["chunk_windows"])
                     if not store.exists(quantile_chunk_done(c))]
            if qtodo:
                pool.map("process_quantiles", qtodo, lambda r, slot: None)
    finally:
        pool.close()
    write_outputs(store, spec, slot_heads(store), n_chunks)
    marker = {"model": {"name": model.name, "architecture": model.architecture, "n_layers": model.n_layers,
                        "n_neurons": model.n_neurons},
              "units": units["units"] if units else {"kind": "mlp_neuron"},
              "layers": layers, "n_neurons": info.n_neurons, "n_windows": n_windows, "n_chunks": n_chunks,
              "seq_len": cfg.corpus.seq_len, "top_k": cfg.records.top_k, "bottom_k": plan["bottom_k"],
              "n_random": cfg.records.n_random,
              "seed": cfg.seed, "corpus": cfg.corpus.source, "neurons_per_file": NEURONS_PER_FILE,
              "quantiles": quantiles, "n_per_quantile": cfg.records.n_per_quantile if quantiles else 0,
              "classifier": plan.get("classifier"),
              "completed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    store.write_json(EXTRACT_MARKER, marker)
    seconds = time.monotonic() - t0
    return ExtractSummary(False, info.name, layers, info.n_neurons, n_windows, n_chunks, len(todo),
                          len(done), seconds, tracker.tokens_per_s, marker)
