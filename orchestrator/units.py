"""What a run's units are, as the run directory records them, and how commands name them.

The unit source (workers/units/source.py `UnitSet.source`: kind, path, format, width, hooks, sha256) is
recorded in run.json's `model.units` by the planner, in `_extract/plan.json` (`unit_source`) and the extraction
marker (`units`) by the extraction stage, and in every table file's metadata (schemas/tables.py `UNITS_KEY`)
by the run store. `status`, `show`, `view` and `report` name a unit by it:

    MLP neuron 5 of layer 3
    SAE latent 123 of layer 3 (blocks.3.hook_resid_post, runs/x-sae)
"""
from __future__ import annotations

from schemas.layout import EXTRACT_MARKER, EXTRACT_PLAN, RUN_FILE

MLP_NEURON = {"kind": "mlp_neuron"}
NOUNS = {"mlp_neuron": "MLP neuron", "sae": "SAE latent", "transcoder": "transcoder latent",
         "direction": "direction"}


def source_of(run_info: dict | None, marker: dict | None = None, plan: dict | None = None) -> dict | None:
    """The unit source from run.json (`run_info`), else the extraction marker, else the extraction plan; None
    when none of them is there yet. A run.json or plan of MLP neurons records no source: `MLP_NEURON`."""
    if run_info:
        units = (run_info.get("model") or {}).get("units")
        if isinstance(units, dict):
            return units
        kind = ((run_info.get("config") or {}).get("units") or MLP_NEURON).get("kind", "mlp_neuron")
        if kind == "mlp_neuron":
            return MLP_NEURON
    if marker and isinstance(marker.get("units"), dict):
        return marker["units"]
    if plan:
        source = plan.get("unit_source")
        return source if isinstance(source, dict) else MLP_NEURON if plan.get("units") is None else None
    if run_info or marker:  # an imported or synthetic run: no units recorded, neurons by default
        return MLP_NEURON
    return None


def recorded_source(store) -> dict | None:
    """The unit source `store` (a RunStore) records so far, or None. Files the user may have damaged are read
    elsewhere with their one-line errors; here an unreadable one counts as absent."""
    docs = []
    for rel in (RUN_FILE, EXTRACT_MARKER, EXTRACT_PLAN):
        try:
            doc = store.read_json(rel) if store.exists(rel) else None
        except (OSError, ValueError):
            doc = None
        docs.append(doc if isinstance(doc, dict) else None)
    return source_of(*docs)


def noun(source: dict | None) -> str:
    """'MLP neuron', 'SAE latent', 'transcoder latent' or 'direction'."""
    kind = (source or MLP_NEURON).get("kind", "mlp_neuron")
    return NOUNS.get(kind, str(kind))


def unit_label(source: dict | None, layer: int, index: int) -> str:
    """'SAE latent 123 of layer 3 (blocks.3.hook_resid_post, runs/x-sae)'; 'MLP neuron 5 of layer 3'."""
    label = f"{noun(source)} {index} of layer {layer}"
    if not source or source.get("kind", "mlp_neuron") == "mlp_neuron":
        return label
    where = [w for w in ((source.get("hooks") or {}).get(str(layer)), source.get("path")) if w]
    return f"{label} ({', '.join(where)})" if where else label


def units_line(source: dict | None) -> str:
    """The run's units in one line: 'SAE latents: 2,048 per layer of runs/x-sae (saelens, topk k=32) at
    blocks.6.hook_resid_post; sha256 3f2a...'; 'MLP neurons'."""
    if not source or source.get("kind", "mlp_neuron") == "mlp_neuron":
        return "MLP neurons"
    parts = [f"{noun(source)}s:"]
    if source.get("n_units"):
        parts.append(f"{source['n_units']:,} per layer of")
    parts.append(str(source.get("path", "?")))
    how = ", ".join(str(x) for x in (source.get("format"), source.get("activation")) if x)
    if source.get("k"):
        how += f" k={source['k']}"
    if how:
        parts.append(f"({how})")
    hooks = list((source.get("hooks") or {}).values())
    line = " ".join(parts) + (f" at {', '.join(hooks)}" if hooks else "")
    return line + (f"; sha256 {source['sha256'][:12]}" if source.get("sha256") else "")
