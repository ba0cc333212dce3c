"""What `neuronsweep status` and `show` print, computed from the run directory alone (no Ray, no driver)."""
from __future__ import annotations

from collections import Counter

import pyarrow.compute as pc

from orchestrator.metrics import failure_reason
from orchestrator.plan import EXTRACT_MARKER, RUN_FILE
from orchestrator.store import RunStore


def run_status(store: RunStore) -> dict:
    run = store.read_json(RUN_FILE)
    ledger = store.read_table("ledger", columns=["status", "error", "prompt_tokens", "completion_tokens",
                                                  "cost_usd", "elapsed_s"])
    counts = Counter(ledger.column("status").to_pylist())
    failures = Counter(failure_reason(e) for s, e in zip(ledger.column("status").to_pylist(),
                                                         ledger.column("error").to_pylist()) if s == "failed")
    from orchestrator.pipeline import committed_summaries

    markers = committed_summaries(store)
    active = sum(m.get("elapsed_s", 0.0) for m in markers.values())
    finished = sum(counts.values())
    scores = store.read_table("scores", columns=["scorer", "score"],
                              filter=pc.field("scorer") == "correlation") if ledger.num_rows else None
    vals = [v for v in (scores.column("score").to_pylist() if scores is not None else []) if v is not None]
    planned = run["plan"]["n_neurons"]
    return {
        "planned": planned, "done": counts["done"], "failed": counts["failed"], "skipped": counts["skipped"],
        "remaining": planned - finished, "shards": f"{len(markers)}/{run['plan']['n_shards']} committed",
        "extraction": "complete" if store.exists(EXTRACT_MARKER) else "not finished",
        "neurons_per_s": finished / active if active else 0.0, "active_s": active,
        "prompt_tokens": _sum(ledger, "prompt_tokens"), "completion_tokens": _sum(ledger, "completion_tokens"),
        "cost_usd": float(pc.sum(ledger.column("cost_usd")).as_py() or 0.0) if ledger.num_rows else 0.0,
        "failures": dict(failures), "scored": len(vals), "mean_score": sum(vals) / len(vals) if vals else None,
    }


def _sum(t, col: str) -> int:
    return int(pc.sum(t.column(col)).as_py() or 0) if t.num_rows else 0


def neuron_detail(store: RunStore, layer: int, neuron: int) -> dict:
    flt = (pc.field("layer") == layer) & (pc.field("neuron") == neuron)
    ledger = store.read_table("ledger", filter=flt).to_pylist()
    records = sorted(store.read_table("records", filter=flt & (pc.field("kind") == "top")).to_pylist(),
                     key=lambda r: r["rank"])
    if records:
        seqs = store.read_table("sequences", columns=["seq_id", "tokens"],
                                filter=pc.field("seq_id").isin([r["seq_id"] for r in records]))
        tokens = dict(zip(seqs.column("seq_id").to_pylist(), seqs.column("tokens").to_pylist()))
        for r in records:
            r["tokens"] = tokens.get(r["seq_id"], [])
    return {
        "ledger": ledger[0] if ledger else None,
        "explanations": sorted(store.read_table("explanations", filter=flt).to_pylist(), key=lambda r: r["candidate"]),
        "scores": store.read_table("scores", filter=flt).to_pylist(),
        "records": records,
    }
