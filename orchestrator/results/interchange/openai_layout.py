"""The objects of OpenAI's neuron-explainer dataset layout (the public GPT-2 XL data of "Language models can
explain neurons"), built from a run's rows; pure functions, no files:

    DIR/collated-activations/<layer>/<neuron>.json   one NeuronRecord
    DIR/explanations/<layer>/<neuron>.jsonl          one line: NeuronSimulationResults

Every object carries the `dataclass_name` that dataset's loader uses, and only that dataset's field names, so
its own code reads what openai_export.py writes; openai_import.py reads the same objects back.
"""
from __future__ import annotations

import math

RECORDS_DIR = "collated-activations"
EXPLANATIONS_DIR = "explanations"
SIMULATED_SCALE = "simulated_normalized_activations"


def json_float(x):
    """A float, or None for NaN and None (JSON null: what orjson writes for NaN in the published files)."""
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else float(x)


def _dc(name: str, **fields) -> dict:
    return {"dataclass_name": name, **fields}


# --- objects of the OpenAI layout (pure) ------------------------------------------------------------------
def activation_record(tokens: list[str], activations: list[float]) -> dict:
    return _dc("ActivationRecord", tokens=list(tokens), activations=[json_float(a) for a in activations])


def neuron_record(layer: int, neuron: int, records: dict[str, list[dict]], stats: dict | None,
                  n_per_quantile: int = 2) -> dict:
    """A NeuronRecord from our records (each {rank, tokens, activations}, by kind) and stats. A quantile record's
    bin is `rank // n_per_quantile` (extraction ranks them bin-major; a bin may hold fewer than n on a small
    corpus, or none); skewness, kurtosis and the quantile boundaries are not kept by a sweep: null."""
    def recs(kind):
        return [activation_record(r["tokens"], r["activations"]) for r in sorted(records.get(kind, []),
                                                                                  key=lambda r: r["rank"])]
    quantile = sorted(records.get("quantile", []), key=lambda r: r["rank"])
    bins: list[list[dict]] | None = None
    if quantile:
        bins = [[] for _ in range(max(r["rank"] for r in quantile) // n_per_quantile + 1)]
        for r in quantile:
            bins[r["rank"] // n_per_quantile].append(activation_record(r["tokens"], r["activations"]))
    stats = stats or {}
    return _dc("NeuronRecord", neuron_id=_dc("NeuronId", layer_index=layer, neuron_index=neuron),
               random_sample=recs("random"), random_sample_by_quantile=bins, quantile_boundaries=None,
               mean=json_float(stats.get("mean")), variance=json_float(stats.get("variance")), skewness=None,
               kurtosis=None, most_positive_activation_records=recs("top"))


def simulation_results(layer: int, neuron: int, explanations: list[dict], score: dict | None,
                       scored: list[dict]) -> dict:
    """A NeuronSimulationResults: the selected explanation first, with its correlation score and the scored
    records ({tokens, true, simulated, per_sequence}); other candidates follow, with no simulation."""
    def sequence(r):
        sim = _dc("SequenceSimulation", tokens=list(r["tokens"]),
                  expected_activations=[json_float(x) for x in r["simulated"]], activation_scale=SIMULATED_SCALE,
                  distribution_values=[[] for _ in r["tokens"]], distribution_probabilities=[[] for _ in r["tokens"]],
                  uncalibrated_simulation=None)
        return _dc("ScoredSequenceSimulation", simulation=sim, true_activations=[json_float(x) for x in r["true"]],
                   ev_correlation_score=json_float(r["per_sequence"]), rsquared_score=None,
                   absolute_dev_explained_score=None)

    out: list[dict] = []
    for e in sorted(explanations, key=lambda e: (not e.get("selected"), e.get("candidate") or 0)):
        first = not out and e.get("selected", True)
        simulation = _dc("ScoredSimulation",
                         scored_sequence_simulations=[sequence(r) for r in scored] if first else [],
                         ev_correlation_score=json_float((score or {}).get("score")) if first else None,
                         rsquared_score=json_float((score or {}).get("r2")) if first else None,
                         absolute_dev_explained_score=json_float((score or {}).get("absdev")) if first else None)
        out.append(_dc("ScoredExplanation", explanation=e["explanation"], scored_simulation=simulation))
    return _dc("NeuronSimulationResults", neuron_id=_dc("NeuronId", layer_index=layer, neuron_index=neuron),
               scored_explanations=out)
