"""A small synthetic but schema-valid run directory, for tests of everything that reads a run.

    store = make_run(tmp_path / "run")                      # 3 layers x 8 neurons, all stages written
    store = make_run(path, layers=(0,), n_neurons=4, commit_layers=())   # extraction only, nothing swept yet

Everything is deterministic from `seed`. Activations follow a planted rule (neuron n of any layer fires on the
tokens of its "topic" word), explanations name that word, and the correlation scores are computed with the
project's own scorer from the stored records and simulated values, so the numbers are the ones a real sweep
would store for the same activations and simulations. Some neurons fail, one is skipped, one has an undefined
score (constant simulation), so readers meet every case. `RunFacts` says which neuron is which.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa

from orchestrator.plan import EXTRACT_MARKER, RUN_FILE, make_shards
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.tables import to_table
from workers.method.records import ActivationRecord
from workers.method.scorers.correlation import correlation_columns
from workers.method.scoring import split_records

WORDS = ["the", " cat", " sat", " on", " mat", " and", " dog", " ran", " in", " park", ",", " code", " def",
         " return", " 42", " 7", "\n", " river", " water", " bank"]
TOPICS = [" cat", " code", " 42", " river", " dog", " park", " def", " water"]
PRICE_PER_TOKEN = 1e-6


@dataclass
class RunFacts:
    """What a test needs to know about the run it got."""
    store: RunStore
    layers: tuple[int, ...]
    n_neurons: int
    failed: set[tuple[int, int]] = field(default_factory=set)      # ledger status failed
    skipped: set[tuple[int, int]] = field(default_factory=set)
    undefined: set[tuple[int, int]] = field(default_factory=set)   # done, but the score is null
    done: set[tuple[int, int]] = field(default_factory=set)        # done (score may still be null)
    config: SweepConfig | None = None

    def topic(self, layer: int, neuron: int) -> str:
        return TOPICS[(layer + neuron) % len(TOPICS)]


def make_run(root, *, layers=(0, 1, 2), n_neurons: int = 8, n_windows: int = 40, seq_len: int = 12,
             n_per_split: int = 2, shard_size: int = 4, seed: int = 0, commit_layers=None,
             best_of: int = 2) -> RunFacts:
    """Write a run directory at `root` (a path or URI). `commit_layers` (default: all) are the layers whose
    shards are swept and committed; the others only have records, like a sweep still running."""
    rng = np.random.default_rng(seed)
    store = RunStore.open(str(root), create=True)
    top_k, n_random = 4 * n_per_split, 3 * n_per_split
    cfg = SweepConfig.from_dict({
        "model": {"name": "tiny-test"}, "layers": ",".join(map(str, layers)), "neurons": f"0-{n_neurons - 1}",
        "corpus": {"seq_len": seq_len, "max_windows": n_windows}, "shard_size": shard_size, "seed": seed,
        "records": {"top_k": top_k, "n_random": n_random, "n_per_split": n_per_split},
        "explainer": {"best_of": best_of, "price_input_per_mtok": 1.0, "price_output_per_mtok": 1.0},
        "output": str(root)})
    facts = RunFacts(store, tuple(layers), n_neurons, config=cfg)
    commit_layers = tuple(layers) if commit_layers is None else tuple(commit_layers)

    token_ids = rng.integers(0, len(WORDS), size=(n_windows, seq_len))
    tokens = [[WORDS[i] for i in row] for row in token_ids]
    store.write_table("sequences", to_table("sequences", [
        {"seq_id": 1000 + s, "token_ids": [int(i) for i in token_ids[s]], "tokens": tokens[s]}
        for s in range(n_windows)]), "part-00000")

    shards = make_shards(list(layers), list(range(n_neurons)), shard_size)
    for layer in layers:
        rec_rows, stat_rows = [], []
        for n in range(n_neurons):
            acts = _activations(rng, tokens, TOPICS[(layer + n) % len(TOPICS)])
            recs = _records(rng, acts, top_k, n_random)
            rec_rows += [{"layer": layer, "neuron": n, "kind": r.kind, "rank": r.rank, "seq_id": 1000 + r.seq_id,
                          "activations": r.activations, "max_activation": max(r.activations)} for r in recs]
            stat_rows.append({"layer": layer, "neuron": n, "mean": float(acts.mean()),
                              "variance": float(acts.var()), "max": float(acts.max()),
                              "frac_positive": float((acts > 0).mean()), "n_tokens": int(acts.size)})
        store.write_table("records", to_table("records", rec_rows), "part-00000", layer)
        store.write_table("neuron_stats", to_table("neuron_stats", stat_rows), "part-00000", layer)

    store.write_json(EXTRACT_MARKER, {"model": "tiny-test", "layers": list(layers), "n_neurons": n_neurons,
                                      "n_windows": n_windows, "seq_len": seq_len, "top_k": top_k,
                                      "n_random": n_random, "seed": seed})
    records = store.read_table("records")
    for shard in shards:
        if shard.layer in commit_layers:
            _sweep_shard(store, facts, shard, records, tokens, n_per_split, best_of, rng)

    store.write_json(RUN_FILE, {
        "config": cfg.model_dump(mode="json"),
        "model": {"name": "tiny-test", "architecture": "GPT2LMHeadModel", "n_layers": max(layers) + 1,
                  "n_neurons": n_neurons, "max_positions": 1024},
        "plan": {"n_neurons": len(layers) * n_neurons, "n_shards": len(shards), "shard_size": shard_size},
        "versions": {"python": "3.11"}, "created_at": "2026-01-01T00:00:00+00:00"})
    return facts


def _activations(rng, tokens, topic: str) -> np.ndarray:
    """One neuron's activation on every token of the corpus: high on its topic word, small noise elsewhere."""
    hit = np.array([[t == topic for t in row] for row in tokens], dtype=np.float32)
    noise = rng.normal(0.0, 0.05, size=hit.shape).astype(np.float32)
    return (hit * rng.uniform(2.0, 4.0, size=hit.shape).astype(np.float32) + noise).astype(np.float32)


def _records(rng, acts: np.ndarray, top_k: int, n_random: int) -> list[ActivationRecord]:
    """Top windows by max activation (ties to the lower window), then a random sample, as extraction keeps."""
    order = sorted(range(acts.shape[0]), key=lambda s: (-float(acts[s].max()), s))[:top_k]
    randoms = rng.choice(acts.shape[0], size=n_random, replace=False)
    out = [ActivationRecord(int(s), [], [float(x) for x in acts[s]], "top", r) for r, s in enumerate(order)]
    out += [ActivationRecord(int(s), [], [float(x) for x in acts[s]], "random", r) for r, s in enumerate(randoms)]
    return out


def _sweep_shard(store, facts, shard, records, tokens, n_per_split, best_of, rng) -> None:
    """Explanations, correlation scores and ledger rows of one shard, as a committed sweep writes them."""
    now = dt.datetime(2026, 1, 1, tzinfo=dt.timezone.utc)
    expl, scores, ledger = [], [], []
    for n in shard.neurons:
        key, topic = (shard.layer, n), facts.topic(shard.layer, n)
        if n % 7 == 5:
            facts.failed.add(key)
            ledger.append({"layer": shard.layer, "neuron": n, "status": "failed", "attempts": 3,
                           "error": "RateLimitError: 429 too many requests" if shard.layer % 2 else
                           "MalformedAnswerError: simulator output could not be aligned",
                           "reason": "rate_limited" if shard.layer % 2 else "malformed",
                           "updated_at": now, "shard_id": shard.shard_id, "prompt_tokens": 900,
                           "completion_tokens": 0, "cost_usd": 900 * PRICE_PER_TOKEN, "elapsed_s": 3.0})
            continue
        if n == 6 and shard.layer == facts.layers[0]:
            facts.skipped.add(key)
            ledger.append({"layer": shard.layer, "neuron": n, "status": "skipped", "attempts": 0,
                           "error": "dead neuron: never activates above 0", "updated_at": now,
                           "shard_id": shard.shard_id})
            continue
        facts.done.add(key)
        mine = _neuron_records(records, shard.layer, n, tokens)
        splits = split_records([r for r in mine if r.kind == "top"], [r for r in mine if r.kind == "random"],
                               n_per_split)
        constant = n == 3 and shard.layer == facts.layers[-1]
        if constant:
            facts.undefined.add(key)
        valid_sim = [_simulate(r, topic, rng, constant) for r in splits["valid"]]
        cal_sim = [_simulate(r, topic, rng, constant) for r in splits["calibration"]]
        cols = correlation_columns(splits["valid"], valid_sim, splits["calibration"], cal_sim)
        cols.pop("_calibration")
        for c in range(best_of):
            text = f"the word{topic.replace(chr(10), ' newline')} and nearby tokens" if c == 0 else \
                f"candidate {c}: mentions of{topic}"
            expl.append({"layer": shard.layer, "neuron": n, "explanation": text, "candidate": c,
                         "selected": c == 0, "explainer_model": "tiny-explainer", "prompt_tokens": 1200,
                         "completion_tokens": 20, "created_at": now})
        scores.append({"layer": shard.layer, "neuron": n, "candidate": 0, "scorer": "correlation", **cols,
                       "simulator_model": "tiny-simulator", "simulator_mode": "prompt_logprob",
                       "settings": "{}", "prompt_tokens": 3000, "completion_tokens": 0})
        used = 1200 * best_of + 3000, 20 * best_of
        ledger.append({"layer": shard.layer, "neuron": n, "status": "done", "attempts": 1, "updated_at": now,
                       "shard_id": shard.shard_id, "prompt_tokens": used[0], "completion_tokens": used[1],
                       "cost_usd": sum(used) * PRICE_PER_TOKEN, "elapsed_s": 1.5})
    name = f"shard-{shard.shard_id}"
    if expl:
        store.write_table("explanations", to_table("explanations", expl), name, shard.layer)
    if scores:
        store.write_table("scores", to_table("scores", scores), name, shard.layer)
    store.write_table("ledger", to_table("ledger", ledger), name, shard.layer)
    store.write_json(f"_markers/{shard.shard_id}.json", {"shard_id": shard.shard_id, "layer": shard.layer,
                                                         "n": len(shard.neurons)})  # a marker without a file list


def _neuron_records(records: pa.Table, layer: int, neuron: int, tokens) -> list[ActivationRecord]:
    rows = [r for r in records.to_pylist() if r["layer"] == layer and r["neuron"] == neuron]
    rows.sort(key=lambda r: (r["kind"] != "top", r["rank"]))
    return [ActivationRecord(r["seq_id"], tokens[r["seq_id"] - 1000], r["activations"], r["kind"], r["rank"])
            for r in rows]


def _simulate(rec: ActivationRecord, topic: str, rng, constant: bool) -> list[float]:
    """A simulator that mostly follows the explanation: 0..10 on the topic word, with some mistakes."""
    if constant:
        return [0.0] * len(rec.tokens)
    return [float(np.clip((9.0 if t == topic else 0.5) + rng.normal(0, 1.5), 0, 10)) for t in rec.tokens]
