"""Step 3 of extraction, quantile records and classifier windows: the picks from every slot's quantile sketch
merged, the chunks the quantile pass must re-run, and the rows it found (docs/method.md §2)."""
from __future__ import annotations

from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.layout import QUANTILE_PICKS, quantile_chunk_layer_file
from workers.extract.checkpoint import load_layer_state, read_bytes, tensor_bytes, tensor_load
from workers.extract.collectors import CollectorSpec
from workers.extract.errors import ExtractError
from workers.extract.keys import N_QUANTILE_BINS
from workers.extract.sketch import QuantileSketch


def pick_kinds(spec: CollectorSpec) -> list[tuple[str, int]]:
    """The record kinds of a layer's picks, as (kind, columns) in column order: quantile records (bin-major),
    stratified classifier windows (bin-major) and non-activating ones."""
    kinds = [("quantile", N_QUANTILE_BINS * spec.n_per_quantile)] if spec.n_per_quantile else []
    if spec.classifier_bins:
        kinds += [("stratified", spec.classifier_bins * spec.classifier_per_bin),
                  ("non_activating", spec.n_non_activating)]
    return kinds


def classifier_windows_plan(cfg: SweepConfig) -> dict | None:
    """The `CollectorSpec` fields of the classifier windows (docs/method.md §2) when a configured scorer or the
    explainer reads them (`classifier.examples: stratified`), else None. With `explainer.examples: stratified`
    each bin holds one more window, the one the explainer is shown (workers/method/explainer.py)."""
    from workers.method.scorers import SCORERS

    c = cfg.classifier
    wanted = cfg.explainer.examples == "stratified" or any(
        SCORERS[name].uses_classifier_windows for name in cfg.scorers if name in SCORERS)
    if c.examples != "stratified" or not wanted:
        return None
    return {"classifier_bins": c.bins, "classifier_per_bin": c.per_bin + (cfg.explainer.examples == "stratified"),
            "n_non_activating": c.n_non_activating, "non_activating_below": c.non_activating_below}


def planned_quantile_picks(store: RunStore, spec: CollectorSpec, heads: dict[int, dict]) -> dict:
    """Every layer's picks [N, columns of `pick_kinds`] from the slots' sketches (`heads`: the checkpoint slots,
    covering every chunk once), computed once and saved (`QUANTILE_PICKS`), so the quantile pass and a resumed
    run see the same picks. The classifier windows' cut needs each neuron's maximum: the slots' running max."""
    import torch

    if store.exists(QUANTILE_PICKS):
        return tensor_load(read_bytes(store, QUANTILE_PICKS))["picks"]
    picks = {}
    for layer in spec.layers:
        merged = _sketch(spec, layer)
        neuron_max = torch.full((spec.n_neurons,), float("-inf"))
        for slot, head in sorted(heads.items()):
            state = load_layer_state(store, slot, head["gen"], layer)
            part = _sketch(spec, layer)
            part.load_state_dict(state["quantiles"])
            merged.merge(part)
            neuron_max = torch.maximum(neuron_max, state["stats"]["max"].float().cpu())
        parts = [merged.picks(spec.n_per_quantile)] if spec.n_per_quantile else []
        if spec.classifier_bins:
            parts.append(merged.classifier_picks(neuron_max, spec.classifier_bins, spec.classifier_per_bin,
                                                 spec.non_activating_below))
        picks[layer] = torch.cat(parts, dim=1)
    store.write_bytes(QUANTILE_PICKS, tensor_bytes({"picks": picks, "n_per_quantile": spec.n_per_quantile,
                                                    "kinds": pick_kinds(spec)}))
    return picks


def _sketch(spec: CollectorSpec, layer: int) -> QuantileSketch:
    return QuantileSketch(spec.n_neurons, spec.sketch_per_bucket, spec.seed, layer, "cpu", n_low=spec.n_non_activating)


def quantile_chunks(picks: dict, chunk_windows: int) -> list[int]:
    """The chunks holding at least one picked window (window seq_id s lies in chunk s // chunk_windows)."""
    import torch

    seq = torch.cat([p.reshape(-1) for p in picks.values()])
    return sorted(set((seq[seq >= 0] // chunk_windows).tolist()))


def quantile_rows(store: RunStore, layer: int, chunks: list[int], picks) -> dict:
    """One layer's picked rows from the quantile pass's chunk files, sorted by neuron then rank (= picks column)."""
    import numpy as np
    import torch

    parts = [tensor_load(read_bytes(store, quantile_chunk_layer_file(c, layer))) for c in chunks]
    cols = {k: torch.cat([p[k] for p in parts]).numpy() for k in ("neuron", "rank", "seq_id", "acts")}
    if len(cols["neuron"]) != int((picks >= 0).sum()):
        raise ExtractError(f"layer {layer}: the quantile pass found {len(cols['neuron'])} of "
                           f"{int((picks >= 0).sum())} picked windows")
    order = np.lexsort((cols["rank"], cols["neuron"]))
    return {k: v[order] for k, v in cols.items()}


def rows_by_kind(rows: dict, kinds: list[tuple[str, int]]) -> dict[str, dict]:
    """`quantile_rows` split into the record kinds of `pick_kinds`, each ranked from 0 within its kind."""
    out, start = {}, 0
    for kind, width in kinds:
        sel = (rows["rank"] >= start) & (rows["rank"] < start + width)
        out[kind] = {**{k: v[sel] for k, v in rows.items()}, "rank": rows["rank"][sel] - start}
        start += width
    return out
