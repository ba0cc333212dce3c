"""`import_openai`: OpenAI's neuron-explainer layout (openai_layout.py; the published data too) read into a run
directory: sequences (each distinct window once), records, neuron stats, the extraction marker (model name
"imported", so a later `neuronsweep sweep --out RUN` needs no subject model), and the explanations and scores
when the files hold them. Every file is validated first (openai_schema.py): one bad file imports nothing."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.plan import IMPORTED
from orchestrator.results.interchange.openai_layout import EXPLANATIONS_DIR, RECORDS_DIR, SIMULATED_SCALE, json_float
from orchestrator.results.interchange.openai_schema import (
    EXPLANATION_FILE,
    RECORD_FILE,
    load_json,
    numbered,
    validate_openai,
)
from orchestrator.store import RunStore
from schemas.layout import EXTRACT_MARKER, records_file, shard_file_name
from schemas.tables import to_table
from workers.method.scoring import correlation_score, split_records


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
    validate_openai(rec_dir, expl_dir, src)  # raises OpenAIImportError, naming every bad file, before any write
    windows, summary = _Windows(), ImportSummary()
    now = dt.datetime.now(dt.timezone.utc)
    max_neuron, top_k, n_random = -1, 0, 0
    for layer, layer_dir in numbered(rec_dir, None, []):
        rec_rows: list[dict[str, Any]] = []
        stat_rows: list[dict[str, Any]] = []
        kinds: dict[int, dict[str, list[int]]] = {}
        for neuron, path in numbered(layer_dir, RECORD_FILE, []):
            doc = load_json(path.read_text())
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
            stat_rows.append({"layer": layer, "neuron": neuron, "mean": json_float(doc.get("mean")),
                              "variance": json_float(doc.get("variance")), "max": max(tops) if tops else None})
            top_k, n_random = max(top_k, len(by_kind["top"])), max(n_random, len(by_kind["random"]))
            max_neuron = max(max_neuron, neuron)
            summary.neurons += 1
        if not rec_rows:
            continue
        summary.layers.append(layer)
        # named by the neuron range it holds, as extraction names its files, so a sweep opens only what it needs
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
    for neuron, path in numbered(layer_dir, EXPLANATION_FILE, []):
        lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
        if not lines:
            continue
        doc = load_json(lines[0])
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
    name = shard_file_name(IMPORTED)
    if expl_rows:
        store.write_table("explanations", to_table("explanations", expl_rows), name, layer)
        store.write_table("ledger", to_table("ledger", ledger_rows), name, layer)
        summary.explanations += len(ledger_rows)
    if score_rows:
        store.write_table("scores", to_table("scores", score_rows), name, layer)
        summary.scores += len(score_rows)


def valid_kinds(top: list[int], random: list[int], scored: list[int]) -> list[str | None]:
    """Which part (top or random) each scored window belongs to. The scored windows are the valid split, top
    records first (docs/method.md §2, the same dealing as OpenAI's), so deal the neuron's records with n = half of them
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
    seq_ids: list[int] = []
    simulated: list[list[float]] = []
    per: list[float | None] = []
    trues: list[list[float]] = []
    parts: dict[str, tuple[list[list[float]], list[list[float]]]] = {"top": ([], []), "random": ([], [])}
    scored_kinds = valid_kinds(kinds.get("top", []), kinds.get("random", []),
                               [windows.id_of(s["simulation"]["tokens"]) for s in seqs])
    for s, kind in zip(seqs, scored_kinds):
        tokens = s["simulation"]["tokens"]
        seq = windows.id_of(tokens)
        values = [0.0 if x is None else float(x) for x in s["simulation"]["expected_activations"]]
        t = [0.0 if x is None else float(x) for x in s.get("true_activations") or true.get((neuron, seq), [])]
        seq_ids.append(seq)
        simulated.append(values)
        per.append(json_float(s.get("ev_correlation_score")))
        trues.append(t)
        if kind in parts:
            parts[kind][0].append(t)
            parts[kind][1].append(values)
    score = json_float(sim.get("ev_correlation_score"))
    return {"layer": layer, "neuron": neuron, "candidate": 0, "scorer": "correlation", "score": score,
            "score_top": correlation_score(*parts["top"]) if parts["top"][0] else None,
            "score_random": correlation_score(*parts["random"]) if parts["random"][0] else None,
            "r2": json_float(sim.get("rsquared_score")), "absdev": json_float(sim.get("absolute_dev_explained_score")),
            "null_reason": None if score is not None else "no ev_correlation_score in the imported file",
            "simulator_model": IMPORTED, "simulator_mode": None,
            "settings": json.dumps({"source": "openai-neuron-explainer", "activation_scale": SIMULATED_SCALE}),
            "seq_ids": seq_ids, "per_sequence": per, "simulated": simulated}
