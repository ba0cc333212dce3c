"""Arrow schemas of every table a run writes, with a schema version stored in each Parquet file.

A reader refuses a file whose major version it does not know, so an old neuronsweep never misreads a new
run (and says which version it found). Minor versions only add nullable columns.
"""
from __future__ import annotations

import pyarrow as pa

SCHEMA_VERSION = "1.4"  # 1.1: scores.auc; 1.2: ledger.reason; 1.3: neuron_stats.min, n_nonfinite, window_max_quantiles;
# 1.4: explanations.polarity, scores.polarity, scores.f1
VERSION_KEY = b"neuronsweep.schema_version"
TABLE_KEY = b"neuronsweep.table"
# JSON of the run's unit source (kind; for latents also path, format, width, hooks, the weights' sha256:
# workers/units/source.py `UnitSet.source`), added to every file a run store writes once the run records it
UNITS_KEY = b"neuronsweep.units"


class SchemaVersionError(ValueError):
    pass


def _schema(name: str, fields: list[pa.Field]) -> pa.Schema:
    return pa.schema(fields, metadata={VERSION_KEY: SCHEMA_VERSION.encode(), TABLE_KEY: name.encode()})


LAYER = pa.field("layer", pa.int16(), nullable=False)
NEURON = pa.field("neuron", pa.int32(), nullable=False)
# Which side of the unit a row explains (docs/method.md §1 "Both signs"): "positive", or "negative" (the method
# run on the negated bottom records). Null in files written before 1.4, which hold the positive side only.
POLARITY = pa.field("polarity", pa.string())
POSITIVE, NEGATIVE = POLARITIES = ("positive", "negative")

SEQUENCES = _schema("sequences", [
    pa.field("seq_id", pa.int64(), nullable=False),
    pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
    pa.field("tokens", pa.list_(pa.string()), nullable=False),
])

RECORDS = _schema("records", [
    LAYER, NEURON,
    pa.field("kind", pa.string(), nullable=False),  # top | bottom | random | quantile | stratified | non_activating
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
    POLARITY,
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
    pa.field("f1", pa.float64()),  # detection/fuzzing: F1 of the judge's answers (null in files before 1.4)
    pa.field("null_reason", pa.string()),
    pa.field("simulator_model", pa.string()),
    pa.field("simulator_mode", pa.string()),
    pa.field("settings", pa.string()),  # JSON: the knobs that produced this score
    pa.field("seq_ids", pa.list_(pa.int64())),  # the scored records, in split order
    pa.field("per_sequence", pa.list_(pa.float64())),
    pa.field("simulated", pa.list_(pa.list_(pa.float32()))),
    pa.field("prompt_tokens", pa.int64()),
    pa.field("completion_tokens", pa.int64()),
    POLARITY,
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


def units_metadata(source: dict) -> dict[bytes, bytes]:
    """The metadata entry naming a table's unit source."""
    import json

    return {UNITS_KEY: json.dumps(source, sort_keys=True).encode()}


def units_of(schema: pa.Schema) -> dict | None:
    """The unit source a file's metadata names, or None (a file written before it was recorded)."""
    import json

    raw = (schema.metadata or {}).get(UNITS_KEY)
    return json.loads(raw) if raw else None


def to_table(name: str, rows: list[dict]) -> pa.Table:
    """Rows (dicts) to a table of the named schema; missing nullable columns become null."""
    schema = TABLES[name]
    cols = {f.name: [r.get(f.name) for r in rows] for f in schema}
    return pa.Table.from_pydict(cols, schema=schema)
