"""`export_bundle`: one row per neuron of a run (identity, status, explanation, every score, stats, top, random
and bottom records with their tokens), as Parquet or JSON lines, for Neuronpedia-style uploads. The explanation
and scores are the positive side's; a negative side (docs/method.md §1 "Both signs") is in its own columns,
`negative_explanation`, `negative_score` and `negative_null_reason`, and its windows are the bottom records."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from orchestrator.results.interchange.openai_layout import json_float
from orchestrator.results.reader import RunReader, read_all, sequence_tokens
from orchestrator.store import RunStore


def bundle_table(store: RunStore) -> pa.Table:
    """One row per neuron in the ledger: identity, model, status, selected explanation, every score, stats, and
    the top, random and bottom records as token lists with activations."""
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
        for kind in ("top", "random", "bottom"):
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
                f.write(json.dumps({k: json_float(v) if isinstance(v, float) else v for k, v in row.items()},
                                   ensure_ascii=False, default=str) + "\n")
    return t.num_rows
