"""Neuron index at GPT-2 XL's size: build it, then time the page queries the viewer makes.

A GPT-2 XL sized run (48 layers x 6,400 neurons = 307,200 neurons, 3% failed, 5% with an undefined score,
explanations of four words from a ten-word vocabulary) as the ledger, explanations and scores tables the
reader holds in memory; `build_index` joins them once, then each query of the viewer runs --repeats times
and its median is reported.

    .venv/bin/python bench/results_index.py [--layers 48] [--per-layer 6400] [--repeats 5]

Last line: results_index_query_ms=<the slowest query's median, in milliseconds>.
"""
from __future__ import annotations

import argparse
import datetime as dt
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.results.index import build_index, query_index  # noqa: E402

T0 = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
WORDS = np.array(["python", "code", "the", "river", "numbers", "dates", "names", "legal", "html", "plural"])
QUERIES = {"first page by score": {}, "page 100": {"offset": 5000},
           "layer + score range": {"layer": 17, "min_score": 0.8},
           "search two words": {"text": "python river"},
           "search + layer + page 3": {"text": "legal", "layer": 3, "offset": 100},
           "ascending": {"descending": False}}


def tables(n_layers: int, per_layer: int, seed: int = 0) -> tuple[pa.Table, pa.Table, pa.Table]:
    """(ledger, explanations, scores) as the reader holds them: one shard per 64 neurons."""
    rng = np.random.default_rng(seed)
    n = n_layers * per_layer
    layer = np.repeat(np.arange(n_layers, dtype=np.int16), per_layer)
    neuron = np.tile(np.arange(per_layer, dtype=np.int32), n_layers)
    shard = pa.array([f"L{lay}-{nr // 64}" for lay, nr in zip(layer, neuron)])
    texts = [" ".join(w) for w in WORDS[rng.integers(0, len(WORDS), size=(n, 4))]]
    status = np.where(rng.random(n) < 0.03, "failed", "done")
    times = pa.array([T0] * n, pa.timestamp("ms", tz="UTC"))
    ledger = pa.table({"layer": layer, "neuron": neuron, "status": status, "error": pa.nulls(n, pa.string()),
                       "updated_at": times, "shard_id": shard, "cost_usd": rng.random(n) * 1e-3, "shard": shard})
    expl = pa.table({"layer": layer, "neuron": neuron, "explanation": texts,
                     "candidate": pa.array(np.zeros(n, np.int16)), "selected": pa.array(np.ones(n, bool)),
                     "explainer_model": pa.array(["m"] * n), "created_at": times, "shard": shard})
    score = np.where(rng.random(n) < 0.05, np.nan, rng.uniform(-0.3, 1.0, n))
    scores = pa.table({"layer": layer, "neuron": neuron, "candidate": pa.array(np.zeros(n, np.int16)),
                       "scorer": pa.array(["correlation"] * n), "score": pa.array(score, from_pandas=True),
                       **{c: pa.array(rng.random(n)) for c in ("score_top", "score_random", "r2", "absdev")},
                       **{c: pa.nulls(n, pa.string()) for c in ("null_reason", "simulator_model", "simulator_mode")},
                       "shard": shard})
    return ledger, expl, scores


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=48)
    ap.add_argument("--per-layer", type=int, default=6400)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    n = args.layers * args.per_layer
    ledger, expl, scores = tables(args.layers, args.per_layer)
    t0 = time.perf_counter()
    index = build_index(ledger, expl, scores)
    build_s = time.perf_counter() - t0
    if index.num_rows != n:
        raise SystemExit(f"the index has {index.num_rows} rows, expected {n}")
    print(f"{n:,}-neuron index: built in {build_s:.2f} s")
    medians = {}
    for name, q in QUERIES.items():
        times = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            page, total = query_index(index, limit=50, **q)
            times.append(time.perf_counter() - t0)
        if page.num_rows != 50 or total < 50:
            raise SystemExit(f"query {name!r}: {page.num_rows} rows of {total}, expected a full page of 50")
        medians[name] = statistics.median(times) * 1000
        print(f"  {name:<26}{medians[name]:8.1f} ms")
    print(f"results_index_build_s={build_s:.2f}")
    print(f"results_index_query_ms={max(medians.values()):.1f}")


if __name__ == "__main__":
    main()
