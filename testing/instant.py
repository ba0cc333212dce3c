"""An instant stand-in for the method and synthetic records, so the orchestration itself (planning,
scheduling, commits, ledger, metrics) can be measured at GPT-2-XL scale on a laptop: `bench/orchestrate.py`.

Select it with `model.name: synthetic:LAYERSxNEURONS` and `run_sweep(..., mode="instant")`; the mode
`instant:SECONDS` makes each neuron take that long (for fault tests that need a sweep to be in flight).
Each neuron reports a fixed, plausible token usage so that budgets and cost accounting can be exercised.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import re
import zlib

from schemas.config import SweepConfig
from workers.llm.backends.base import Usage
from workers.method.neuron import NeuronResult
from workers.method.records import ActivationRecord, NeuronRecords

TOKENS = ["The", " cat", " sat", " on", " the", " mat", "."]


def synthetic_shape(cfg: SweepConfig) -> tuple[int, int]:
    m = re.fullmatch(r"synthetic:(\d+)x(\d+)", cfg.model.name)
    if not m:
        raise ValueError(f"model.name: instant mode needs 'synthetic:LAYERSxNEURONS', got {cfg.model.name!r}")
    return int(m.group(1)), int(m.group(2))


WORDS = ["The", " year", " 1987", " was", " (", "a", ")", " good", " one", ",", " and", " 42", " of", " the", "."]


class SyntheticRecordSource:
    """Deterministic records from (layer, neuron): one short top record (`full=False`, for the instant
    method), or the configured top_k + n_random windows of seq_len tokens firing on digits (`full=True`,
    for the real method against the rule-following stub backend)."""

    def __init__(self, cfg: SweepConfig, full: bool = False):
        self.cfg = cfg
        self.full = full

    def _record(self, layer: int, neuron: int, seq_id: int, kind: str, rank: int) -> ActivationRecord:
        n = self.cfg.corpus.seq_len
        tokens = [WORDS[(seq_id * 7 + i * 3 + neuron) % len(WORDS)] for i in range(n)]
        scale = 1.0 + (zlib.crc32(f"{layer}:{neuron}:{seq_id}".encode()) % 100) / 50
        acts = [scale * (4.0 if t.strip().isdigit() else 0.0) - 0.05 * (i % 3) for i, t in enumerate(tokens)]
        return ActivationRecord(seq_id, tokens, acts, kind, rank)

    def load(self, shard) -> dict[int, NeuronRecords]:
        if self.full:
            r = self.cfg.records
            return {n: NeuronRecords(shard.layer, n,
                                     top=[self._record(shard.layer, n, k, "top", k) for k in range(r.top_k)],
                                     random=[self._record(shard.layer, n, 1000 + k, "random", k)
                                             for k in range(r.n_random)])
                    for n in shard.neurons}
        out = {}
        for n in shard.neurons:
            peak = 1.0 + (zlib.crc32(f"{shard.layer}:{n}".encode()) % 1000) / 100
            acts = [0.0, peak, 0.0, peak / 2, 0.0, 0.0, 0.1]
            out[n] = NeuronRecords(shard.layer, n, top=[ActivationRecord(n, TOKENS, acts, "top", 0)])
        return out


USAGE = {"explainer": (2000, 30), "simulator": (12000, 100)}  # tokens per neuron, as in DESIGN.md


class InstantProcessor:
    """Answers at once (or after `delay_s`) with a fixed explanation and a score derived from the records."""

    def __init__(self, cfg: SweepConfig, delay_s: float = 0.0):
        self.cfg = cfg
        self.delay_s = delay_s
        self.now = dt.datetime.now(dt.timezone.utc)

    async def __call__(self, records: NeuronRecords) -> NeuronResult:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        top = records.top[0]
        peak = max(top.activations)
        result = NeuronResult(records.layer, records.neuron)
        base = {"layer": records.layer, "neuron": records.neuron}
        result.explanation_rows = [{**base, "explanation": "the word 'cat'", "candidate": 0, "selected": True,
                                    "explainer_model": "instant", "prompt_tokens": 0, "completion_tokens": 0,
                                    "created_at": self.now}]
        result.score_rows = [{**base, "candidate": 0, "scorer": "correlation", "score": min(1.0, peak / 10),
                              "simulator_model": "instant", "simulator_mode": "instant", "seq_ids": [top.seq_id],
                              "per_sequence": [min(1.0, peak / 10)]}]
        result.usage = {role: Usage(*tokens) for role, tokens in USAGE.items()}
        return result
