"""Step 1 of extraction: the run's pinned settings (`_extract/plan.json`: a partial extraction is continued
only with the same ones) and the corpus cut into windows, one `sequences` part per chunk."""
from __future__ import annotations

from orchestrator.extraction.quantiles import classifier_windows_plan
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.layout import EXTRACT_PLAN, SEQUENCES_MANIFEST, sequences_part, table_file
from workers.extract.corpus import TokenDecoder, Window, iter_windows, sequences_table
from workers.extract.errors import ExtractError
from workers.models.loading import load_tokenizer

DEFAULT_CHUNK_WINDOWS = 512
# The checkpoint layout of a slot's collector: 2 added bottom records, min / non-finite counts and the quantile
# sketch (in place of per-chunk window maxima), so a partial run of layout 1 cannot be continued.
STATE_FORMAT = 2
# settings that must match for a run directory's partial extraction to be continued
PLAN_KEYS = ("model", "layers", "n_neurons", "seq_len", "top_k", "n_random", "seed", "corpus", "max_windows",
             "chunk_windows", "quantiles", "n_per_quantile", "bottom_k", "state_format", "units", "classifier")
# plans written before these settings existed
PLAN_DEFAULTS = {"quantiles": False, "n_per_quantile": 2, "bottom_k": 0, "state_format": 1, "units": None,
                 "classifier": None}


def bottom_k_for(cfg: SweepConfig, architecture: str) -> int:
    """`records.bottom_k`, with null resolved by the family: top_k where the neuron is act(gate) * up (unbounded
    below), 0 where it is a GELU / ReLU output (bounded below, near -0.17 at most)."""
    from workers.models.registry import FAMILIES

    if cfg.records.bottom_k is not None:
        return cfg.records.bottom_k
    if cfg.units.kind in ("sae", "transcoder"):  # latents are >= 0: no bottom records
        return 0
    mlp = FAMILIES[architecture].mlp
    return cfg.records.top_k if mlp is not None and mlp[0].startswith("gated") else 0


def checked_plan(cfg: SweepConfig, store: RunStore, info, layers: list[int], chunk_windows: int,
                 unit_source: dict | None = None, *, complete: bool = False) -> dict:
    """The extraction plan of `store` (written here when the run has none yet); an ExtractError when the run
    holds an extraction made with other settings. `complete`: the run's extraction is finished (only checked;
    one from before plans were recorded has nothing to check against)."""
    if complete and not store.exists(EXTRACT_PLAN):
        return {}
    plan = {"model": info.name, "layers": layers, "n_neurons": info.n_neurons, "seq_len": cfg.corpus.seq_len,
            "top_k": cfg.records.top_k, "n_random": cfg.records.n_random, "seed": cfg.seed,
            "corpus": cfg.corpus.source, "max_windows": cfg.corpus.max_windows, "chunk_windows": chunk_windows,
            "quantiles": cfg.records.quantiles, "n_per_quantile": cfg.records.n_per_quantile,
            "bottom_k": bottom_k_for(cfg, info.architecture), "state_format": STATE_FORMAT,
            "units": None if cfg.units.kind == "mlp_neuron" else cfg.units.model_dump(mode="json"),
            "classifier": classifier_windows_plan(cfg)}
    if unit_source:  # latents: their dictionary, weights hash included (workers/units/source.py)
        plan["unit_source"] = unit_source
    if store.exists(EXTRACT_PLAN):
        old = {**PLAN_DEFAULTS, **store.read_json(EXTRACT_PLAN)}
        if unit_source:
            from workers.units.source import check_same_source

            check_same_source(old.get("unit_source"), unit_source, store.root)
        if not plan["quantiles"]:  # n_per_quantile is unused then
            old["n_per_quantile"] = plan["n_per_quantile"] = PLAN_DEFAULTS["n_per_quantile"]
        diff = [k for k in PLAN_KEYS if k != "chunk_windows" and old.get(k) != plan[k]]
        if diff:
            raise ExtractError(
                f"{store.root} holds a {'complete' if complete else 'partial'} extraction with other settings "
                f"({', '.join(diff)}: "
                f"{', '.join(f'{old.get(k)!r} there, {plan[k]!r} now' for k in diff)}); use a new --out")
        return old  # the chunking of a started run is kept, whatever chunk size is asked now
    store.write_json(EXTRACT_PLAN, plan)
    return plan


def write_sequences(cfg: SweepConfig, store: RunStore, chunk_windows: int) -> dict:
    """Cut the corpus into windows, write one sequences part per chunk (skipping parts already there)."""
    if store.exists(SEQUENCES_MANIFEST):
        return store.read_json(SEQUENCES_MANIFEST)
    tokenizer = load_tokenizer(cfg.model.name)
    decoder = TokenDecoder(tokenizer)
    n_windows, chunk = 0, 0
    buf: list[Window] = []

    def flush():
        nonlocal chunk, buf
        if buf:
            if not store.exists(table_file("sequences", sequences_part(chunk))):
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
