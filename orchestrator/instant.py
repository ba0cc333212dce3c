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
from workers.backends.base import Usage
from workers.neuron import NeuronResult
from workers.records import ActivationRecord, NeuronRecords

TOKENS = ["The", " cat", " sat", " on", " the", " mat", "."]


def synthetic_shape(cfg: SweepConfig) -> tuple[int, int]:
    m = re.fullmatch(r"synthetic:(\d+)x(\d+)", cfg.model.name)
    if not m:
        raise ValueError(f"model.name: instant mode needs 'synthetic:LAYERSxNEURONS', got {cfg.model.name!r}")
    return int(m.group(1)), int(m.group(2))


class SyntheticRecordSource:
    """One short top record per neuron, deterministic from (layer, neuron)."""

    def __init__(self, cfg: SweepConfig):
        self.cfg = cfg

    def load(self, shard) -> dict[int, NeuronRecords]:
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
