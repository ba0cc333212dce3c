"""Neuronpedia's upload layout, out (`export_neuronpedia`) and back in (`import_neuronpedia`).

The layout is the one Neuronpedia's own export writes and its importer reads (neuronpedia's
utils/neuronpedia-utils/neuronpedia_utils/export-data.py; field names from apps/webapp/prisma/schema.prisma):

    DEST/<modelId>/<sourceId>/model.jsonl       the Model row (id, layers, neuronsPerLayer, ...)
                              release.jsonl     the SourceRelease row (name, description, creatorName, ...)
                              sourceset.jsonl   the SourceSet row (modelId, name, type, releaseName, ...)
                              source.jsonl      the Source row (id, modelId, setName, saelensConfig, dataset, ...)
                              features/batch-N.jsonl.gz      Neuron rows (modelId, layer, index, maxActApprox,
                                                             frac_nonzero, hookName, ...)
                              explanations/batch-N.jsonl.gz  Explanation rows (modelId, layer, index, description,
                                                             typeName, explanationModelName, ...)
                              activations/batch-N.jsonl.gz   Activation rows (modelId, layer, index, tokens, values,
                                                             maxValue, minValue, maxValueTokenIndex, ...)

One source per layer, `<layer>-<setName>` as Neuronpedia names them ("6-res-jb"); `layer` in every row is that
source id and `index` the unit's index, both strings. Batch N holds units [N * 1024, (N + 1) * 1024). Our own
rows carry ids that say what they were, so a round trip is exact: an activation's id ends in
`-<kind>-<rank>` (top, random or quantile record and its rank), and `dataIndex` is its window's seq_id.
Activations from elsewhere (no such id) are imported as top records, largest maxValue first.
"""
from __future__ import annotations

import datetime as dt
import gzip
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from orchestrator.results.interchange.openai_import import _Windows
from orchestrator.results.interchange.openai_layout import json_float
from orchestrator.results.reader import RunReader, read_all
from orchestrator.store import RunStore
from schemas.layout import EXTRACT_MARKER, IMPORTED, records_file, shard_file_name
from schemas.tables import to_table

BATCH = 1024  # units per batch file, as Neuronpedia's export batches them
EXPLANATION_TYPE = "oai_token-act-pair"  # Neuronpedia's type for OpenAI's token-activation-pair explanations
SET_NAMES = {"mlp_neuron": "mlp", "sae": "sae", "transcoder": "transcoder", "direction": "direction"}
_OUR_ACTIVATION = re.compile(r"-(top|random|quantile)-(\d+)$")
_SOURCE_LAYER = re.compile(r"(\d+)(?:-.*)?")


@dataclass
class NeuronpediaSummary:
    features: int = 0
    explanations: int = 0
    activations: int = 0
    sources: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    windows: int = 0


def model_id_of(name: str) -> str:
    """A Neuronpedia model id (lowercase letters, digits, '-' and '_') from a model name or hub id."""
    return re.sub(r"[^a-z0-9_-]+", "-", name.lower()).strip("-") or "model"


def _unit_source(reader: RunReader) -> dict:
    marker = reader.extract_marker() or {}
    units = marker.get("units") or ((reader.run_info().get("config") or {}).get("units")) or {}
    return units if isinstance(units, dict) else {}


def _model_name(reader: RunReader) -> str:
    info = reader.run_info()
    model = (info.get("model") or {}).get("name") or (reader.extract_marker() or {}).get("model") or "model"
    return model.get("name", "model") if isinstance(model, dict) else str(model)


def export_neuronpedia(store: RunStore, dest: str | Path, *, model_id: str | None = None,
                       set_name: str | None = None, release: str | None = None,
                       creator_id: str = "neuronsweep") -> NeuronpediaSummary:
    """Write every unit of the run with stats or records (and its selected explanation, when it has one) in
    Neuronpedia's layout under `dest`."""
    reader = RunReader(store)
    units = _unit_source(reader)
    kind = units.get("kind") or "mlp_neuron"
    model_id = model_id or model_id_of(_model_name(reader))
    set_name = set_name or f"{SET_NAMES.get(kind, kind)}-neuronsweep"
    release = release or f"{model_id}-{set_name}"
    marker = reader.extract_marker() or {}
    m = marker.get("model")
    marker_model: dict = m if isinstance(m, dict) else {}
    n_layers = (reader.run_info().get("model") or {}).get("n_layers") or marker_model.get("n_layers")
    now = dt.datetime.now(dt.timezone.utc).isoformat()
    stats = read_all(store, "neuron_stats").to_pylist()
    records = read_all(store, "records").to_pylist()
    tokens = dict(zip(*(store.read_table("sequences", columns=["seq_id", "tokens"])[c].to_pylist()
                        for c in ("seq_id", "tokens"))))
    index = [r for r in reader.index().to_pylist() if r.get("explanation")]
    layers = sorted({r["layer"] for r in stats} | {r["layer"] for r in records})
    n_units = int(marker.get("n_neurons") or 1 + max((r["neuron"] for r in stats + records), default=0))
    hooks = units.get("hooks") or {}
    out, summary = Path(dest) / model_id, NeuronpediaSummary()
    for layer in layers:
        source = f"{layer}-{set_name}"
        base = out / source
        _write_jsonl(base / "model.jsonl", [{
            "id": model_id, "displayNameShort": model_id, "displayName": _model_name(reader),
            "creatorId": creator_id, "tlensId": None, "dimension": None, "visibility": "PUBLIC",
            "inferenceEnabled": False, "instruct": False, "layers": int(n_layers or max(layers) + 1),
            "neuronsPerLayer": n_units, "owner": "", "website": None, "createdAt": now, "updatedAt": now}])
        _write_jsonl(base / "release.jsonl", [{
            "name": release, "visibility": "PUBLIC", "isNewUi": False, "featured": False,
            "description": f"{kind} units of {_model_name(reader)} explained by neuronsweep",
            "descriptionShort": None, "urls": [], "creatorEmail": None, "creatorName": "neuronsweep",
            "creatorNameShort": None, "creatorId": creator_id, "defaultSourceSetName": set_name,
            "defaultSourceId": source, "defaultUmapSourceIds": [], "createdAt": now}])
        _write_jsonl(base / "sourceset.jsonl", [{
            "modelId": model_id, "name": set_name, "hasDashboards": True, "allowInferenceSearch": False,
            "visibility": "PUBLIC", "description": f"{kind} units, explained by neuronsweep", "type": kind,
            "creatorName": "neuronsweep", "urls": [], "creatorEmail": None, "creatorId": creator_id,
            "releaseName": release, "defaultRange": 1, "defaultShowBreaks": True, "showDfa": False,
            "showCorrelated": False, "showHeadAttribution": False, "showUmap": False, "createdAt": now}])
        _write_jsonl(base / "source.jsonl", [{
            "id": source, "modelId": model_id, "hasDashboards": True, "inferenceEnabled": False,
            "saelensConfig": units or None, "saelensRelease": None, "saelensSaeId": None, "hfRepoId": None,
            "hfFolderId": None, "visibility": "PUBLIC", "setName": set_name, "creatorId": creator_id,
            "hasUmap": False, "hasUmapLogSparsity": False, "hasUmapClusters": False,
            "num_prompts": marker.get("n_windows"), "num_tokens_in_prompt": marker.get("seq_len"),
            "dataset": marker.get("corpus"), "notes": "exported by neuronsweep", "createdAt": now}])
        common = {"modelId": model_id, "layer": source}
        features = [{**common, "index": str(r["neuron"]), "maxActApprox": json_float(r["max"]),
                     "creatorId": creator_id, "frac_nonzero": json_float(r["frac_positive"]) or 0.0,
                     "sourceSetName": set_name, "hookName": hooks.get(str(layer)), "hasVector": False,
                     "vector": [], "vectorLabel": None}
                    for r in sorted((r for r in stats if r["layer"] == layer), key=lambda r: r["neuron"])]
        explanations = [{**common, "id": f"ns-{model_id}-{source}-{r['neuron']}-explanation",
                         "index": str(r["neuron"]), "authorId": creator_id, "description": r["explanation"],
                         "typeName": EXPLANATION_TYPE, "explanationModelName": r.get("explainer_model"),
                         "scoreV1": json_float(r.get("score")) or 0.0}
                        for r in index if r["layer"] == layer]
        activations = []
        # the positive side only: Neuronpedia's activations are a feature's activating examples; bottom records
        # belong to a negative side (docs/method.md §1 "Both signs"), which its layout has no place for
        for r in sorted((r for r in records if r["layer"] == layer and r["kind"] in _KIND),
                        key=lambda r: (r["neuron"], _KIND[r["kind"]], r["rank"])):
            values = [float(v) for v in r["activations"]]
            top = max(range(len(values)), key=values.__getitem__) if values else 0
            activations.append({
                **common, "id": f"ns-{model_id}-{source}-{r['neuron']}-{r['kind']}-{r['rank']}",
                "index": str(r["neuron"]), "creatorId": creator_id, "dataSource": marker.get("corpus"),
                "dataIndex": str(r["seq_id"]), "tokens": tokens.get(r["seq_id"], []), "values": values,
                "maxValue": max(values, default=0.0), "minValue": min(values, default=0.0),
                "maxValueTokenIndex": top, "dfaValues": [], "dfaMaxValue": None, "dfaTargetIndex": None,
                "binContains": None, "binMin": None, "binMax": None})
        for name, rows in (("features", features), ("explanations", explanations), ("activations", activations)):
            _write_batches(base / name, rows)
        summary.features += len(features)
        summary.explanations += len(explanations)
        summary.activations += len(activations)
        summary.sources.append(source)
        summary.layers.append(layer)
    return summary


_KIND = {"top": 0, "random": 1, "quantile": 2}


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, allow_nan=False, ensure_ascii=False) + "\n" for r in rows)
    if path.suffix == ".gz":
        path.write_bytes(gzip.compress(text.encode(), compresslevel=5))
    else:
        path.write_text(text)


def _write_batches(folder: Path, rows: list[dict]) -> None:
    batches: dict[int, list[dict]] = {}
    for r in rows:
        batches.setdefault(int(r["index"]) // BATCH, []).append(r)
    for b, part in sorted(batches.items()):
        _write_jsonl(folder / f"batch-{b}.jsonl.gz", part)


# --- import ---------------------------------------------------------------------------------------------------------
def _read_jsonl(path: Path) -> list[dict]:
    data = gzip.decompress(path.read_bytes()).decode() if path.suffix == ".gz" else path.read_text()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def _batches(folder: Path) -> list[dict]:
    if not folder.is_dir():
        return []
    files = sorted(folder.glob("batch-*.jsonl*"), key=lambda p: int(re.findall(r"\d+", p.name)[0]))
    return [row for f in files for row in _read_jsonl(f)]


def source_dirs(src: Path) -> list[Path]:
    """Every source folder under `src` (one holding features/, activations/ or explanations/), `src` included."""
    dirs = {p.parent for name in ("features", "activations", "explanations") for p in src.rglob(name) if p.is_dir()}
    return sorted(dirs, key=lambda p: (_layer_of_source(p.name) if _SOURCE_LAYER.fullmatch(p.name) else -1, str(p)))


def _layer_of_source(source: str) -> int:
    m = _SOURCE_LAYER.fullmatch(source)
    if not m:
        raise ValueError(f"Neuronpedia source {source!r}: the id does not start with its layer (like '6-res-jb')")
    return int(m.group(1))


def import_neuronpedia(src: str | Path, store: RunStore) -> NeuronpediaSummary:
    """Read Neuronpedia's layout under `src` (a source folder, a model folder, or an export root) into the run
    directory `store`: sequences (each distinct window once), records, neuron stats (max, frac_positive),
    explanations with a done ledger row, and the extraction marker (model "imported": a later sweep re-explains
    or re-scores these records without a subject model)."""
    src = Path(src)
    dirs = source_dirs(src)
    if not dirs:
        raise ValueError(f"{src}: no Neuronpedia source folder (with features/, activations/ or explanations/)")
    windows, summary = _Windows(), NeuronpediaSummary()
    now = dt.datetime.now(dt.timezone.utc)
    max_unit, top_k, n_random, n_layers, units = -1, 0, 0, None, None
    for folder in dirs:
        layer = _layer_of_source(folder.name)
        if layer in summary.layers:
            raise ValueError(f"{src}: two sources for layer {layer} ({folder.name}); import one at a time")
        model = (_read_jsonl(folder / "model.jsonl") or [{}])[0] if (folder / "model.jsonl").exists() else {}
        n_layers = model.get("layers") or n_layers
        source_row = (_read_jsonl(folder / "source.jsonl") or [{}])[0] if (folder / "source.jsonl").exists() else {}
        units = source_row.get("saelensConfig") or units
        rec_rows, by_unit = _activation_records(_batches(folder / "activations"), layer, windows)
        counts: dict[tuple[int, str], int] = {}
        for r in rec_rows:
            counts.setdefault((r["neuron"], r["kind"]), 0)
            counts[(r["neuron"], r["kind"])] += 1
        top_k = max([top_k] + [c for (_, k), c in counts.items() if k == "top"])
        n_random = max([n_random] + [c for (_, k), c in counts.items() if k == "random"])
        features = {int(f["index"]): f for f in _batches(folder / "features")}
        stat_rows = [{"layer": layer, "neuron": i, "max": json_float(f.get("maxActApprox")),
                      "frac_positive": json_float(f.get("frac_nonzero"))} for i, f in sorted(features.items())]
        units_here = set(features) | set(by_unit)
        max_unit = max([max_unit, *units_here])
        summary.features += len(features)
        summary.activations += len(rec_rows)
        if rec_rows:
            lo, hi = min(by_unit), max(by_unit) + 1
            store.write_table("records", to_table("records", rec_rows), records_file(lo, hi), layer)
        if stat_rows:
            store.write_table("neuron_stats", to_table("neuron_stats", stat_rows), IMPORTED, layer)
        _import_explanations(store, _batches(folder / "explanations"), layer, now, summary)
        windows.flush(store, layer)
        summary.layers.append(layer)
        summary.sources.append(folder.name)
    if max_unit < 0:
        raise ValueError(f"{src}: no features, activations or explanations found")
    summary.windows = len(windows.ids)
    n_layers = int(n_layers or max(summary.layers) + 1)
    store.write_json(EXTRACT_MARKER, {
        "model": {"name": IMPORTED, "architecture": "unknown", "n_layers": n_layers, "n_neurons": max_unit + 1},
        "layers": sorted(summary.layers), "n_neurons": max_unit + 1, "n_windows": summary.windows,
        "seq_len": windows.seq_len, "top_k": top_k, "n_random": n_random, "seed": 0, "source": str(src),
        "units": units if isinstance(units, dict) else None, "imported_at": now.isoformat()})
    return summary


def _activation_records(rows: list[dict], layer: int, windows) -> tuple[list[dict], dict[int, list[dict]]]:
    """`records` rows from Activation rows: ours keep their kind and rank (from the id); others are top records
    ranked by maxValue, largest first."""
    by_unit: dict[int, list[dict]] = {}
    for a in rows:
        by_unit.setdefault(int(a["index"]), []).append(a)
    out = []
    for unit, acts in sorted(by_unit.items()):
        foreign = sorted((a for a in acts if not _OUR_ACTIVATION.search(str(a.get("id", "")))),
                         key=lambda a: -float(a.get("maxValue") or 0.0))
        ranked = [(m.group(1), int(m.group(2)), a) for a in acts
                  if (m := _OUR_ACTIVATION.search(str(a.get("id", ""))))]
        ranked += [("top", i, a) for i, a in enumerate(foreign)]
        for kind, rank, a in sorted(ranked, key=lambda x: (_KIND[x[0]], x[1])):
            values = [0.0 if v is None else float(v) for v in a.get("values") or []]
            out.append({"layer": layer, "neuron": unit, "kind": kind, "rank": rank,
                        "seq_id": windows.id_of(list(a.get("tokens") or [])), "activations": values,
                        "max_activation": max(values, default=0.0)})
    return out, by_unit


def _import_explanations(store: RunStore, rows: list[dict], layer: int, now, summary: NeuronpediaSummary) -> None:
    expl_rows: list[dict] = []
    ledger_rows: list[dict] = []
    seen: set[int] = set()
    for e in rows:
        unit = int(e["index"])
        candidate = len([r for r in expl_rows if r["neuron"] == unit])
        expl_rows.append({"layer": layer, "neuron": unit, "explanation": e.get("description") or "",
                          "candidate": candidate, "selected": candidate == 0,
                          "explainer_model": e.get("explanationModelName") or IMPORTED, "created_at": now})
        if unit not in seen:
            seen.add(unit)
            ledger_rows.append({"layer": layer, "neuron": unit, "status": "done", "attempts": 0, "updated_at": now,
                                "shard_id": IMPORTED, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
    if expl_rows:
        name = shard_file_name(IMPORTED)
        store.write_table("explanations", to_table("explanations", expl_rows), name, layer)
        store.write_table("ledger", to_table("ledger", ledger_rows), name, layer)
        summary.explanations += len(expl_rows)
