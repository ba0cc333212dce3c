"""Step 3 of extraction, quantile records: the picks from every slot's quantile sketch merged, the chunks the
quantile pass must re-run, and the rows it found (docs/method.md §2)."""
from __future__ import annotations

from orchestrator.store import RunStore
from schemas.layout import QUANTILE_PICKS, quantile_chunk_layer_file
from workers.extract.checkpoint import load_layer_state, read_bytes, tensor_bytes, tensor_load
from workers.extract.collectors import CollectorSpec
from workers.extract.errors import ExtractError
from workers.extract.sketch import QuantileSketch


def planned_quantile_picks(store: RunStore, spec: CollectorSpec, heads: dict[int, dict]) -> dict:
    """Every layer's quantile picks [N, bins * n_per_quantile] from the slots' sketches (`heads`: the checkpoint
    slots, covering every chunk once), computed once and saved (`QUANTILE_PICKS`), so the quantile pass and a
    resumed run see the same picks."""
    if store.exists(QUANTILE_PICKS):
        return tensor_load(read_bytes(store, QUANTILE_PICKS))["picks"]
    picks = {}
    for layer in spec.layers:
        merged = QuantileSketch(spec.n_neurons, spec.n_per_quantile, spec.seed, layer, "cpu")
        for slot, head in sorted(heads.items()):
            part = QuantileSketch(spec.n_neurons, spec.n_per_quantile, spec.seed, layer, "cpu")
            part.load_state_dict(load_layer_state(store, slot, head["gen"], layer)["quantiles"])
            merged.merge(part)
        picks[layer] = merged.picks()
    store.write_bytes(QUANTILE_PICKS, tensor_bytes({"picks": picks, "n_per_quantile": spec.n_per_quantile}))
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

    parts = [tensor_load(read_bytes(store, quantile_chunk_layer_file(c, layer))) for c in chunks]
    cols = {k: torch.cat([p[k] for p in parts]).numpy() for k in ("neuron", "rank", "seq_id", "acts")}
    if len(cols["neuron"]) != int((picks >= 0).sum()):
        raise ExtractError(f"layer {layer}: the quantile pass found {len(cols['neuron'])} of "
                           f"{int((picks >= 0).sum())} picked windows")
    order = np.lexsort((cols["rank"], cols["neuron"]))
    return {k: v[order] for k, v in cols.items()}
