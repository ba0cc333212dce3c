"""Moving results in and out of a run directory.

OpenAI's neuron-explainer dataset layout (the public GPT-2 XL data of "Language models can explain neurons"):

    DIR/collated-activations/<layer>/<neuron>.json   one NeuronRecord
    DIR/explanations/<layer>/<neuron>.jsonl          one line: NeuronSimulationResults

Every object carries the `dataclass_name` that dataset's loader uses, and only that dataset's field names, so
its own code reads what we write. `export_openai` writes a run in that layout; `import_openai` reads it (the
published data too) into a run directory: sequences (each distinct window once), records, neuron stats, the
extraction marker (model name "imported", so a later `neuronsweep sweep --out RUN` needs no subject model),
and the explanations and scores when the files hold them. `export_bundle` writes one row per neuron (a
Parquet or JSON-lines file) for Neuronpedia-style uploads. The field mapping is in docs/readme/results.md.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from orchestrator.plan import EXTRACT_MARKER, IMPORTED
from orchestrator.results.reader import RunReader, read_all, sequence_tokens
from orchestrator.store import RunStore
from schemas.tables import to_table
from workers.method.scoring import correlation_score, split_records

RECORDS_DIR = "collated-activations"
EXPLANATIONS_DIR = "explanations"
SIMULATED_SCALE = "simulated_normalized_activations"


def _f(x):
    """A float, or None for NaN and None (JSON null: what orjson writes for NaN in the published files)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _dc(name: str, **fields) -> dict:
    return {"dataclass_name": name, **fields}


# --- objects of the OpenAI layout (pure) ------------------------------------------------------------------
def activation_record(tokens: list[str], activations: list[float]) -> dict:
    return _dc("ActivationRecord", tokens=list(tokens), activations=[_f(a) for a in activations])


def neuron_record(layer: int, neuron: int, records: dict[str, list[dict]], stats: dict | None,
                  n_per_quantile: int = 2) -> dict:
    """A NeuronRecord from our records (each {rank, tokens, activations}, by kind) and stats. A quantile record's
    bin is `rank // n_per_quantile` (extraction ranks them bin-major; a bin may hold fewer than n on a small
    corpus, or none); skewness, kurtosis and the quantile boundaries are not kept by a sweep: null."""
    def recs(kind):
        return [activation_record(r["tokens"], r["activations"]) for r in sorted(records.get(kind, []),
                                                                                  key=lambda r: r["rank"])]
    quantile = sorted(records.get("quantile", []), key=lambda r: r["rank"])
    bins = None
    if quantile:
        bins = [[] for _ in range(max(r["rank"] for r in quantile) // n_per_quantile + 1)]
        for r in quantile:
            bins[r["rank"] // n_per_quantile].append(activation_record(r["tokens"], r["activations"]))
    stats = stats or {}
    return _dc("NeuronRecord", neuron_id=_dc("NeuronId", layer_index=layer, neuron_index=neuron),
               random_sample=recs("random"), random_sample_by_quantile=bins, quantile_boundaries=None,
               mean=_f(stats.get("mean")), variance=_f(stats.get("variance")), skewness=None, kurtosis=None,
               most_positive_activation_records=recs("top"))


def simulation_results(layer: int, neuron: int, explanations: list[dict], score: dict | None,
                       scored: list[dict]) -> dict:
    """A NeuronSimulationResults: the selected explanation first, with its correlation score and the scored
    records ({tokens, true, simulated, per_sequence}); other candidates follow, with no simulation."""
    def sequence(r):
        sim = _dc("SequenceSimulation", tokens=list(r["tokens"]), expected_activations=[_f(x) for x in r["simulated"]],
                  activation_scale=SIMULATED_SCALE, distribution_values=[[] for _ in r["tokens"]],
                  distribution_probabilities=[[] for _ in r["tokens"]], uncalibrated_simulation=None)
        return _dc("ScoredSequenceSimulation", simulation=sim, true_activations=[_f(x) for x in r["true"]],
                   ev_correlation_score=_f(r["per_sequence"]), rsquared_score=None, absolute_dev_explained_score=None)

    out = []
    for e in sorted(explanations, key=lambda e: (not e.get("selected"), e.get("candidate") or 0)):
        first = not out and e.get("selected", True)
        simulation = _dc("ScoredSimulation",
                         scored_sequence_simulations=[sequence(r) for r in scored] if first else [],
                         ev_correlation_score=_f((score or {}).get("score")) if first else None,
                         rsquared_score=_f((score or {}).get("r2")) if first else None,
                         absolute_dev_explained_score=_f((score or {}).get("absdev")) if first else None)
        out.append(_dc("ScoredExplanation", explanation=e["explanation"], scored_simulation=simulation))
    return _dc("NeuronSimulationResults", neuron_id=_dc("NeuronId", layer_index=layer, neuron_index=neuron),
               scored_explanations=out)


# --- export -----------------------------------------------------------------------------------------------
@dataclass
class ExportSummary:
    neurons: int = 0          # neuron-record files written
    explanations: int = 0     # explanation files written
    files: list[str] = field(default_factory=list)


def _by_neuron(rows: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in rows:
        out.setdefault(r["neuron"], []).append(r)
    return out


def export_openai(store: RunStore, out_dir: str | Path) -> ExportSummary:
    """Write every neuron with records (and its explanation, when it has one) in the OpenAI layout."""
    out = Path(out_dir)
    reader = RunReader(store)
    index = {(r["layer"], r["neuron"]): r for r in reader.index().select(["layer", "neuron", "shard_id"]).to_pylist()}
    n_per_quantile = ((reader.run_info().get("config") or {}).get("records") or {}).get("n_per_quantile") or 2
    summary = ExportSummary()
    records = read_all(store, "records")
    stats = {(r["layer"], r["neuron"]): r for r in read_all(store, "neuron_stats").to_pylist()}
    explanations = read_all(store, "explanations").to_pylist()
    scores = read_all(store, "scores").to_pylist()
    tokens = _all_tokens(store)
    expl_by = _group(explanations, index)
    score_by = _group([s for s in scores if s["scorer"] == "correlation"], index)
    for layer in sorted(set(records["layer"].to_pylist())):
        layer_rows = records.filter(pc.equal(records["layer"], layer)).to_pylist()
        for neuron, rows in sorted(_by_neuron(layer_rows).items()):
            by_kind: dict[str, list] = {}
            true_by_seq = {}
            for r in rows:
                by_kind.setdefault(r["kind"], []).append({**r, "tokens": tokens[r["seq_id"]]})
                true_by_seq.setdefault(r["seq_id"], r["activations"])
            rec = neuron_record(layer, neuron, by_kind, stats.get((layer, neuron)), n_per_quantile)
            summary.files.append(_write_json(out / RECORDS_DIR / str(layer) / f"{neuron}.json", rec))
            summary.neurons += 1
            expl = expl_by.get((layer, neuron))
            if expl:
                score = (score_by.get((layer, neuron)) or [None])[0]
                scored = _scored_records(score, tokens, true_by_seq) if score and score.get("simulated") else []
                doc = simulation_results(layer, neuron, expl, score, scored)
                summary.files.append(_write_json(out / EXPLANATIONS_DIR / str(layer) / f"{neuron}.jsonl", doc))
                summary.explanations += 1
    return summary


def _scored_records(score: dict, tokens: dict, true_by_seq: dict) -> list[dict]:
    per = score.get("per_sequence") or [None] * len(score["seq_ids"])
    return [{"tokens": tokens[s], "true": true_by_seq[s], "simulated": sim, "per_sequence": p}
            for s, sim, p in zip(score["seq_ids"], score["simulated"], per)]


def _group(rows: list[dict], index: dict) -> dict[tuple[int, int], list[dict]]:
    """Rows by neuron, keeping those of the shard the ledger names when a neuron has rows in several."""
    out: dict[tuple[int, int], list[dict]] = {}
    for r in rows:
        out.setdefault((r["layer"], r["neuron"]), []).append(r)
    for key, rs in out.items():
        shard = (index.get(key) or {}).get("shard_id")
        if shard is not None and any(r["shard"] == shard for r in rs):
            out[key] = [r for r in rs if r["shard"] == shard]
    return out


def _all_tokens(store: RunStore) -> dict[int, list[str]]:
    t = store.read_table("sequences", columns=["seq_id", "tokens"])
    return dict(zip(t["seq_id"].to_pylist(), t["tokens"].to_pylist()))


def _write_json(path: Path, obj: dict) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, allow_nan=False, ensure_ascii=False) + ("\n" if path.suffix == ".jsonl" else ""))
    os.replace(tmp, path)
    return str(path)


# --- import -----------------------------------------------------------------------------------------------
@dataclass
class ImportSummary:
    neurons: int = 0
    windows: int = 0
    explanations: int = 0
    scores: int = 0
    layers: list[int] = field(default_factory=list)


def _numbered(path: Path) -> list[tuple[int, Path]]:
    return sorted((int(p.name.split(".")[0]), p) for p in path.iterdir() if p.name.split(".")[0].isdigit()) \
        if path.is_dir() else []


def _layout(src: Path) -> tuple[Path, Path | None]:
    """(records dir, explanations dir): DIR/collated-activations + DIR/explanations, or DIR itself holding
    <layer>/<neuron>.json files."""
    if (src / RECORDS_DIR).is_dir():
        return src / RECORDS_DIR, (src / EXPLANATIONS_DIR if (src / EXPLANATIONS_DIR).is_dir() else None)
    if _numbered(src):
        return src, None
    raise ValueError(f"{src}: no {RECORDS_DIR}/<layer>/<neuron>.json files (nor <layer>/<neuron>.json) found")


class _Windows:
    """Distinct token windows, each stored once under a new seq_id (imported records carry no window ids)."""

    def __init__(self):
        self.ids: dict[bytes, int] = {}
        self.pending: list[dict] = []
        self.seq_len = 0

    def id_of(self, tokens: list[str]) -> int:
        key = hashlib.blake2b("\x00".join(tokens).encode(), digest_size=16).digest()
        if key not in self.ids:
            self.ids[key] = len(self.ids)
            self.pending.append({"seq_id": self.ids[key], "token_ids": [], "tokens": list(tokens)})
            self.seq_len = max(self.seq_len, len(tokens))
        return self.ids[key]

    def flush(self, store: RunStore, part: int) -> None:
        if self.pending:
            store.write_table("sequences", to_table("sequences", self.pending), f"{IMPORTED}-{part:05d}")
            self.pending = []


def import_openai(src: str | Path, store: RunStore, *, n_layers: int | None = None,
                  n_neurons: int | None = None) -> ImportSummary:
    """Read the OpenAI layout under `src` into the run directory `store` (see the module docstring)."""
    rec_dir, expl_dir = _layout(Path(src))
    windows, summary = _Windows(), ImportSummary()
    now = dt.datetime.now(dt.timezone.utc)
    max_neuron, top_k, n_random = -1, 0, 0
    for layer, layer_dir in _numbered(rec_dir):
        rec_rows, stat_rows, kinds = [], [], {}
        for neuron, path in _numbered(layer_dir):
            doc = json.loads(path.read_text())
            bins = doc.get("random_sample_by_quantile") or []
            per_bin = max((len(b) for b in bins), default=0)
            by_kind = {"top": doc.get("most_positive_activation_records") or [],
                       "random": doc.get("random_sample") or [],
                       "quantile": [r for b in bins for r in b]}
            ranks = {"quantile": [i * per_bin + j for i, b in enumerate(bins) for j in range(len(b))]}
            for kind, recs in by_kind.items():
                for i, r in enumerate(recs):
                    rank = ranks[kind][i] if kind in ranks else i  # quantile: bin-major, as extraction ranks them
                    acts = [0.0 if a is None else float(a) for a in r["activations"]]
                    seq = windows.id_of(r["tokens"])
                    rec_rows.append({"layer": layer, "neuron": neuron, "kind": kind, "rank": rank, "seq_id": seq,
                                     "activations": acts, "max_activation": max(acts) if acts else 0.0})
            kinds[neuron] = {k: [windows.id_of(r["tokens"]) for r in by_kind[k]] for k in ("top", "random")}
            tops = [max(r["activations"]) for r in by_kind["top"] if r["activations"]]
            stat_rows.append({"layer": layer, "neuron": neuron, "mean": _f(doc.get("mean")),
                              "variance": _f(doc.get("variance")), "max": max(tops) if tops else None})
            top_k, n_random = max(top_k, len(by_kind["top"])), max(n_random, len(by_kind["random"]))
            max_neuron = max(max_neuron, neuron)
            summary.neurons += 1
        if not rec_rows:
            continue
        summary.layers.append(layer)
        # named by the neuron range it holds, as extraction names its files, so a sweep opens only what it needs
        from orchestrator.extraction import records_file
        lo, hi = min(r["neuron"] for r in rec_rows), max(r["neuron"] for r in rec_rows) + 1
        store.write_table("records", to_table("records", rec_rows), records_file(lo, hi), layer)
        store.write_table("neuron_stats", to_table("neuron_stats", stat_rows), IMPORTED, layer)
        if expl_dir is not None:
            _import_explanations(store, expl_dir / str(layer), layer, windows, kinds, rec_rows, now, summary)
        windows.flush(store, layer)
    if not summary.layers:
        raise ValueError(f"{src}: no neuron records found")
    summary.windows = len(windows.ids)
    n_layers = n_layers or max(summary.layers) + 1
    n_neurons = n_neurons or max_neuron + 1
    store.write_json(EXTRACT_MARKER, {
        "model": {"name": IMPORTED, "architecture": "unknown", "n_layers": n_layers, "n_neurons": n_neurons},
        "layers": summary.layers, "n_neurons": n_neurons, "n_windows": summary.windows, "seq_len": windows.seq_len,
        "top_k": top_k, "n_random": n_random, "seed": 0, "source": str(src), "imported_at": now.isoformat()})
    return summary


def _import_explanations(store, layer_dir: Path, layer: int, windows: _Windows, kinds: dict, rec_rows: list,
                         now, summary: ImportSummary) -> None:
    true = {(r["neuron"], r["seq_id"]): r["activations"] for r in rec_rows}
    expl_rows, score_rows, ledger_rows = [], [], []
    for neuron, path in _numbered(layer_dir):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            continue
        doc = json.loads(lines[0])
        scored = doc.get("scored_explanations") or []
        for i, se in enumerate(scored):
            expl_rows.append({"layer": layer, "neuron": neuron, "explanation": se["explanation"], "candidate": i,
                              "selected": i == 0, "explainer_model": IMPORTED, "created_at": now})
        if not scored:
            continue
        sim = scored[0].get("scored_simulation") or {}
        seqs = sim.get("scored_sequence_simulations") or []
        if seqs or sim.get("ev_correlation_score") is not None:
            score_rows.append(_score_row(layer, neuron, sim, seqs, windows, kinds.get(neuron, {}), true))
        ledger_rows.append({"layer": layer, "neuron": neuron, "status": "done", "attempts": 0, "updated_at": now,
                            "shard_id": IMPORTED, "prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
    name = f"shard-{IMPORTED}"
    if expl_rows:
        store.write_table("explanations", to_table("explanations", expl_rows), name, layer)
        store.write_table("ledger", to_table("ledger", ledger_rows), name, layer)
        summary.explanations += len(ledger_rows)
    if score_rows:
        store.write_table("scores", to_table("scores", score_rows), name, layer)
        summary.scores += len(score_rows)


def valid_kinds(top: list[int], random: list[int], scored: list[int]) -> list[str | None]:
    """Which part (top or random) each scored window belongs to. The scored windows are the valid split, top
    records first (SPEC §2, the same dealing as OpenAI's), so deal the neuron's records with n = half of them
    (all of them when there are no random records) and check the windows agree; else match each window to the
    neuron's records by its tokens, top first."""
    for n in {len(scored) // 2, len(scored)} - {0}:
        try:
            valid = split_records([("top", s) for s in top], [("random", s) for s in random], n)["valid"]
        except ValueError:
            continue
        if [s for _, s in valid] == scored:
            return [k for k, _ in valid]
    return ["top" if s in top else "random" if s in random else None for s in scored]


def _score_row(layer, neuron, sim: dict, seqs: list[dict], windows: _Windows, kinds: dict, true: dict) -> dict:
    """A correlation `scores` row from a ScoredSimulation. The top/random parts are recomputed from the scored
    records (see `valid_kinds`)."""
    seq_ids, simulated, per, trues, parts = [], [], [], [], {"top": ([], []), "random": ([], [])}
    scored_kinds = valid_kinds(kinds.get("top", []), kinds.get("random", []),
                               [windows.id_of(s["simulation"]["tokens"]) for s in seqs])
    for s, kind in zip(seqs, scored_kinds):
        tokens = s["simulation"]["tokens"]
        seq = windows.id_of(tokens)
        values = [0.0 if x is None else float(x) for x in s["simulation"]["expected_activations"]]
        t = [0.0 if x is None else float(x) for x in s.get("true_activations") or true.get((neuron, seq), [])]
        seq_ids.append(seq)
        simulated.append(values)
        per.append(_f(s.get("ev_correlation_score")))
        trues.append(t)
        if kind in parts:
            parts[kind][0].append(t)
            parts[kind][1].append(values)
    score = _f(sim.get("ev_correlation_score"))
    return {"layer": layer, "neuron": neuron, "candidate": 0, "scorer": "correlation", "score": score,
            "score_top": correlation_score(*parts["top"]) if parts["top"][0] else None,
            "score_random": correlation_score(*parts["random"]) if parts["random"][0] else None,
            "r2": _f(sim.get("rsquared_score")), "absdev": _f(sim.get("absolute_dev_explained_score")),
            "null_reason": None if score is not None else "no ev_correlation_score in the imported file",
            "simulator_model": IMPORTED, "simulator_mode": None,
            "settings": json.dumps({"source": "openai-neuron-explainer", "activation_scale": SIMULATED_SCALE}),
            "seq_ids": seq_ids, "per_sequence": per, "simulated": simulated}


# --- the per-neuron bundle --------------------------------------------------------------------------------
def bundle_table(store: RunStore) -> pa.Table:
    """One row per neuron in the ledger: identity, model, status, selected explanation, every score, stats, and
    the top and random records as token lists with activations."""
    reader = RunReader(store)
    index = reader.index()
    info = reader.run_info()
    model = (info.get("model") or {}).get("name") or ((reader.extract_marker() or {}).get("model") or {})
    model = model.get("name") if isinstance(model, dict) else model
    stats = {(r["layer"], r["neuron"]): r for r in read_all(store, "neuron_stats").to_pylist()}
    records = read_all(store, "records", ["neuron", "kind", "rank", "seq_id", "activations"])
    tokens = sequence_tokens(store, records["seq_id"].to_pylist())
    recs: dict[tuple[int, int], dict[str, list]] = {}
    for r in sorted(records.to_pylist(), key=lambda r: r["rank"]):
        recs.setdefault((r["layer"], r["neuron"]), {}).setdefault(r["kind"], []).append(r)
    rows = []
    for r in index.to_pylist():
        key = (r["layer"], r["neuron"])
        st, rk = stats.get(key) or {}, recs.get(key) or {}
        row = {"model": model, **{k: v for k, v in r.items() if k not in ("shard_id", "attempts", "elapsed_s")}}
        row.update({f"stat_{k}": st.get(k) for k in ("mean", "variance", "max", "frac_positive", "n_tokens")})
        for kind in ("top", "random"):
            row[f"{kind}_tokens"] = [tokens.get(x["seq_id"], []) for x in rk.get(kind, [])]
            row[f"{kind}_activations"] = [x["activations"] for x in rk.get(kind, [])]
        rows.append(row)
    return pa.Table.from_pylist(rows) if rows else pa.table({"layer": pa.array([], pa.int16())})


def export_bundle(store: RunStore, path: str | Path) -> int:
    """Write the bundle to `path`: Parquet for *.parquet, JSON lines otherwise. Returns the number of rows."""
    t = bundle_table(store)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pq.write_table(t, path, compression="zstd")
    else:
        with path.open("w") as f:
            for row in t.to_pylist():
                f.write(json.dumps({k: _f(v) if isinstance(v, float) else v for k, v in row.items()},
                                   ensure_ascii=False, default=str) + "\n")
    return t.num_rows
