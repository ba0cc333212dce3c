"""`export_openai`: every neuron of a run directory that has records (and its explanation, when it has one)
written in OpenAI's neuron-explainer layout (openai_layout.py).

That layout holds one side of a neuron: the positive side is exported; a negative side (docs/method.md §1 "Both
signs") and the bottom records are left out (the bundle export carries them)."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.compute as pc

from orchestrator.results.interchange.openai_layout import (
    EXPLANATIONS_DIR,
    RECORDS_DIR,
    neuron_record,
    simulation_results,
)
from orchestrator.results.reader import RunReader, read_all
from orchestrator.store import RunStore
from schemas.tables import POSITIVE


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
    explanations = [r for r in read_all(store, "explanations").to_pylist() if r["polarity"] == POSITIVE]
    scores = [r for r in read_all(store, "scores").to_pylist() if r["polarity"] == POSITIVE]
    tokens = _all_tokens(store)
    expl_by = _group(explanations, index)
    score_by = _group([s for s in scores if s["scorer"] == "correlation"], index)
    for layer in sorted(set(records["layer"].to_pylist())):
        layer_rows = records.filter(pc.equal(records["layer"], layer)).to_pylist()
        for neuron, rows in sorted(_by_neuron(layer_rows).items()):
            by_kind: dict[str, list] = {}
            true_by_seq: dict[int, list[float]] = {}
            for r in rows:
                by_kind.setdefault(r["kind"], []).append({**r, "tokens": tokens[r["seq_id"]]})
                true_by_seq.setdefault(r["seq_id"], r["activations"])
            rec = neuron_record(layer, neuron, by_kind, stats.get((layer, neuron)), n_per_quantile)
            summary.files.append(_write_json(out / RECORDS_DIR / str(layer) / f"{neuron}.json", rec))
            summary.neurons += 1
            expl = expl_by.get((layer, neuron))
            if expl:
                neuron_scores = score_by.get((layer, neuron))
                score = neuron_scores[0] if neuron_scores else None
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
