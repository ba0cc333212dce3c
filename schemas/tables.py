"""Arrow schemas of every table a run writes, with a schema version stored in each Parquet file.

A reader refuses a file whose major version it does not know, so an old neuronsweep never misreads a new
run (and says which version it found). Minor versions only add nullable columns.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.3"  # 1.1: scores.auc; 1.2: ledger.reason; 1.3: neuron_stats.min, n_nonfinite, window_max_quantiles
VERSION_KEY = b"neuronsweep.schema_version"
TABLE_KEY = b"neuronsweep.table"


class SchemaVersionError(ValueError):
    pass


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={VERSION_KEY: SCHEMA_VERSION.encode(), TABLE_KEY: name.encode()})


LAYER = pa.field("layer", pa.int16(), nullable=False)
NEURON = pa.field("neuron", pa.int32(), nullable=False)

SEQUENCES = _schema("sequences", [
    pa.field("seq_id", pa.int64(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("tokens", pa.list_(pa.string()), nullable=False),
])

RECORDS = _schema("records", [
    LAYER, NEURON,
    pa.field("kind", pa.string(), nullable=False),  # top | bottom | random | quantile
    pa.field("rank", pa.int16(), nullable=False),
    pa.field("seq_id", pa.int64(), nullable=False),
    pa.field("activations", pa.list_(pa.float32()), nullable=False),
    pa.field("max_activation", pa.float32(), nullable=False),
])

NEURON_STATS = _schema("neuron_stats", [
    LAYER, NEURON,
    pa.field("mean", pa.float64()),
    pa.field("variance", pa.float64()),
    pa.field("max", pa.float32()),
    pa.field("frac_positive", pa.float64()),
    pa.field("n_tokens", pa.int64()),
    pa.field("min", pa.float32()),
    pa.field("n_nonfinite", pa.int64()),  # NaN / ±inf activations; the columns above but n_tokens leave them out
    pa.field("window_max_quantiles", pa.list_(pa.float32())),  # at 0.5, 0.9, 0.99, 0.999 (quantile records only)
])

EXPLANATIONS = _schema("explanations", [
    LAYER, NEURON,
    pa.field("explanation", pa.string(), nullable=False),
    pa.field("candidate", pa.int16(), nullable=False),
    pa.field("selected", pa.bool_()),
    pa.field("explainer_model", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("created_at", pa.timestamp("ms", tz="UTC")),
])

SCORES = _schema("scores", [
    LAYER, NEURON,
    pa.field("candidate", pa.int16()),
    pa.field("scorer", pa.string(), nullable=False),  # correlation | detection | fuzzing | embedding
    pa.field("score", pa.float64()),
    pa.field("score_top", pa.float64()),
    pa.field("score_random", pa.float64()),
    pa.field("r2", pa.float64()),
    pa.field("absdev", pa.float64()),
    pa.field("auc", pa.float64()),  # detection/fuzzing with probabilities; embedding's score is itself an AUC
    pa.field("null_reason", pa.string()),
    pa.field("simulator_model", pa.string()),
    pa.field("simulator_mode", pa.string()),
    pa.field("settings", pa.string()),  # JSON: the knobs that produced this score
    pa.field("seq_ids", pa.list_(pa.int64())),  # the scored records, in split order
    pa.field("per_sequence", pa.list_(pa.float64())),
    pa.field("simulated", pa.list_(pa.list_(pa.float32()))),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
])

LEDGER = _schema("ledger", [
    LAYER, NEURON,
    pa.field("status", pa.string(), nullable=False),  # done | failed | skipped
    pa.field("attempts", pa.int16()),
    pa.field("error", pa.string()),
    pa.field("reason", pa.string()),  # a FailureReason value (schemas/failures.py) for a failed neuron, "dead" for
    # a skipped one (never above 0), else null
    pa.field("updated_at", pa.timestamp("ms", tz="UTC")),
    pa.field("shard_id", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("cost_usd", pa.float64()),
    pa.field("elapsed_s", pa.float64()),
])

CALLS = _schema("calls", [
    pa.field("key", pa.string(), nullable=False),
    pa.field("provider", pa.string()),
    pa.field("model", pa.string()),
    pa.field("status", pa.string()),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    pa.field("latency_s", pa.float64()),
    pa.field("response", pa.string()),  # JSON
    pa.field("at", pa.timestamp("ms", tz="UTC")),
])

TABLES: dict[str, pa.Schema] = {
    "sequences": SEQUENCES, "records": RECORDS, "neuron_stats": NEURON_STATS, "explanations": EXPLANATIONS,
    "scores": SCORES, "ledger": LEDGER, "calls": CALLS,
}


def check_version(schema: pa.Schema, source: str = "file") -> None:
    """Refuse a file written under an unknown major schema version."""
    meta = schema.metadata or {}
    found = meta.get(VERSION_KEY)
    if found is None:
        raise SchemaVersionError(f"{source}: no neuronsweep schema version in its metadata; not a neuronsweep table")
    major = found.decode().split(".")[0]
    if major != SCHEMA_VERSION.split(".")[0]:
        raise SchemaVersionError(
            f"{source}: written with schema version {found.decode()}, this neuronsweep reads "
            f"{SCHEMA_VERSION.split('.')[0]}.x; upgrade neuronsweep to read it")


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) to a table of the named schema; missing nullable columns become null."""
    schema = TABLES[name]
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)
