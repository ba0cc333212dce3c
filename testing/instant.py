"""An instant stand-in for the method and synthetic records, so the orchestration itself (planning,
scheduling, commits, ledger, metrics) can be measured at GPT-2-XL scale on a laptop: `bench/orchestrate.py`.

    prepare_synthetic_run(cfg, n_layers=3, n_neurons=40)     # the run directory "holds" a 3 x 40 model
    run_sweep(cfg, {}, runner_factory=InstantRunnerFactory())        # or InstantRunnerFactory(delay_s=0.1)
    run_sweep(cfg, {}, runner_factory=StubMethodRunnerFactory())     # the real method, instant stub backend
    run_sweep(cfg, env, runner_factory=SyntheticMethodRunnerFactory())   # the method through cfg's backends

`InstantRunnerFactory(delay_s)` makes each neuron take that long (for fault tests that need a sweep to be in
flight). Each neuron reports a fixed, plausible token usage so that budgets and cost accounting can be exercised.
"""
from __future__ import annotations

import asyncio
import datetime as dt
import os
import zlib
from dataclasses import dataclass

from orchestrator.pipeline import MethodRunnerFactory, RunnerFactory
from orchestrator.plan import IMPORTED
from orchestrator.shards import ShardRunner, record_call
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.failures import FailureReason
from schemas.layout import EXTRACT_MARKER
from workers.llm.backends.base import Usage
from workers.method.neuron import NeuronResult
from workers.method.records import ActivationRecord, NeuronRecords

TOKENS = ["The", " cat", " sat", " on", " the", " mat", "."]


def prepare_synthetic_run(cfg: SweepConfig, n_layers: int, n_neurons: int, *,
                          s3_options: dict | None = None) -> RunStore:
    """Make `cfg.output` a run directory whose extraction is done for a model of this shape, as an import
    leaves it (the planner takes the shape from the marker; no model is ever loaded). Records come from
    `SyntheticRecordSource`, not from the directory. A directory already prepared is left as it is."""
    if n_layers < 1 or n_neurons < 1:
        raise ValueError(f"a synthetic model needs at least 1 layer and 1 neuron, got {n_layers} x {n_neurons}")
    store = RunStore.open(cfg.output, s3_options=s3_options, create=True)
    if not store.exists(EXTRACT_MARKER):
        store.write_json(EXTRACT_MARKER, {"model": {"name": IMPORTED, "n_layers": n_layers, "n_neurons": n_neurons},
                                          "synthetic": True})
    return store


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


USAGE = {"explainer": (2000, 30), "simulator": (12000, 100)}  # tokens per neuron, as in docs/design.md "Scale on paper"


class InstantProcessor:
    """Answers at once (or after `delay_s`) with a fixed explanation and a score derived from the records.

    With `gate_file`, neurons of layers >= `gate_from_layer` wait until that file exists: a test holds a sweep
    in flight at a known point (every earlier layer committed, nothing later) and opens the gate by creating it.
    The (layer, neuron) pairs in `fail` fail (reason malformed) after paying the usual tokens; those in `crash`
    kill the process running them, every time (a shard that takes its actor down)."""

    def __init__(self, cfg: SweepConfig, delay_s: float = 0.0, gate_file: str | None = None,
                 gate_from_layer: int = 0, fail: frozenset = frozenset(), crash: frozenset = frozenset()):
        self.cfg = cfg
        self.delay_s = delay_s
        self.gate_file, self.gate_from_layer = gate_file, gate_from_layer
        self.fail, self.crash = frozenset(fail), frozenset(crash)
        self.now = dt.datetime.now(dt.timezone.utc)

    async def __call__(self, records: NeuronRecords) -> NeuronResult:
        if self.gate_file and records.layer >= self.gate_from_layer:
            while not os.path.exists(self.gate_file):
                await asyncio.sleep(0.02)
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        key = (records.layer, records.neuron)
        if key in self.crash:
            os._exit(1)  # no cleanup, no exception to catch: as a segfault or the OOM killer would
        result = NeuronResult(records.layer, records.neuron)
        result.usage = {role: Usage(*tokens) for role, tokens in USAGE.items()}
        if key in self.fail:
            result.error = f"layer {records.layer} neuron {records.neuron}: planted failure"
            result.reason = FailureReason.MALFORMED
            return result
        top = records.top[0]
        peak = max(top.activations)
        base = {"layer": records.layer, "neuron": records.neuron}
        result.explanation_rows = [{**base, "explanation": "the word 'cat'", "candidate": 0, "selected": True,
                                    "explainer_model": "instant", "prompt_tokens": 0, "completion_tokens": 0,
                                    "created_at": self.now}]
        result.score_rows = [{**base, "candidate": 0, "scorer": "correlation", "score": min(1.0, peak / 10),
                              "simulator_model": "instant", "simulator_mode": "instant", "seq_ids": [top.seq_id],
                              "per_sequence": [min(1.0, peak / 10)]}]
        return result


@dataclass(frozen=True)
class InstantRunnerFactory(RunnerFactory):
    """ShardRunners with the instant method on short synthetic records (see `InstantProcessor` for the gate and
    the planted failures and crashes)."""
    delay_s: float = 0.0  # per neuron
    gate_file: str | None = None  # a path on a file system every actor sees (a local cluster's)
    gate_from_layer: int = 0
    fail: frozenset = frozenset()  # (layer, neuron) pairs that fail
    crash: frozenset = frozenset()  # (layer, neuron) pairs that kill their actor

    calls_configured_backends = False

    def holds_local_llm(self, cfg: SweepConfig) -> bool:
        return False

    def __call__(self, cfg: SweepConfig, env, store: RunStore) -> ShardRunner:
        processor = InstantProcessor(cfg, self.delay_s, self.gate_file, self.gate_from_layer, self.fail, self.crash)
        return ShardRunner(cfg, store, processor, SyntheticRecordSource(cfg))


@dataclass(frozen=True)
class StubMethodRunnerFactory(RunnerFactory):
    """ShardRunners with the real method (prompts, parsing, scoring) against the instant rule-following stub
    backend, on full-size synthetic records that fire on digits."""

    calls_configured_backends = False

    def holds_local_llm(self, cfg: SweepConfig) -> bool:
        return False

    def __call__(self, cfg: SweepConfig, env, store: RunStore) -> ShardRunner:
        from testing.stubs import RuleStubBackend
        from workers.llm.client import LLMClient
        from workers.method.neuron import explain_and_score

        explainer, simulator = (LLMClient(RuleStubBackend(), role=role, on_call=record_call)
                                for role in ("explainer", "simulator"))

        async def process(records):
            return await explain_and_score(records, explainer, simulator, cfg)
        return ShardRunner(cfg, store, process, SyntheticRecordSource(cfg, full=True))


@dataclass(frozen=True)
class SyntheticMethodRunnerFactory(MethodRunnerFactory):
    """The real method through the configured LLM backends (HTTP, retries, call journal, shared rate limiter),
    on full-size synthetic records: a sweep's calls reach a test server with nothing extracted first."""

    def __call__(self, cfg: SweepConfig, env, store: RunStore) -> ShardRunner:
        runner = super().__call__(cfg, env, store)
        runner.records = SyntheticRecordSource(cfg, full=True)
        return runner
