"""The sweep on Ray Core: extraction, then explain -> simulate -> score per shard on async actors.

The driver keeps at most `max_inflight_shards` shards per actor in flight (`ray.wait`), so its memory stays
flat whatever the number of neurons; it only ever holds shard summaries. Actors restart on failure and their
calls are retried (`max_restarts=-1`, `max_task_retries=-1`): a shard is idempotent (deterministic file
names, marker last, calls answered from the journal), so a retried shard neither duplicates rows nor pays
twice. The run directory, not Ray, is the source of truth: a new driver lists the markers and schedules only
what is missing.
"""
from __future__ import annotations

import asyncio
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from orchestrator.metrics import SweepMetrics
from orchestrator.plan import EXTRACT_MARKER, IMPORTED, Plan, Shard, prepare_run
from orchestrator.shards import MARKERS, ShardRunner, StoreRecordSource, record_call
from orchestrator.store import RunStore
from schemas.config import ConfigError, SweepConfig


# --- what a ShardActor runs: the real method, or an instant stand-in for benchmarks ---------------------------------
def journal_path(cfg: SweepConfig, store: RunStore, cache_dir: Path | None = None) -> Path:
    """The call journal is a local SQLite file: inside a local run directory, else in a local cache keyed by
    the run URI (an object store cannot host SQLite; committed shards also carry their calls in `calls/`)."""
    if store.is_local:
        return Path(store.root) / "_journal" / "calls.sqlite"
    digest = hashlib.sha256(cfg.output.encode()).hexdigest()[:16]
    return (cache_dir or Path.home() / ".cache" / "neuronsweep" / "journal") / f"{digest}.sqlite"


def method_processor(cfg: SweepConfig, env: Mapping[str, str], journal):
    """The published method through our LLM clients (journal, retries, shared rate limiter)."""
    from workers.llm.backends import make_backend
    from workers.llm.client import make_client
    from workers.method.neuron import explain_and_score

    backends = {}
    for role in ("explainer", "simulator"):
        b = getattr(cfg, role)
        key = (b.kind, b.model) if b.kind == "local" else (role,)
        if key not in backends:  # explainer and simulator share one local model in memory
            backends[key] = make_backend(b, env=env)
        backends[role] = backends[key]
    explainer = make_client(cfg.explainer, env=env, role="explainer", journal=journal, on_call=record_call,
                            backend=backends["explainer"])
    simulator = make_client(cfg.simulator, env=env, role="simulator", journal=journal, on_call=record_call,
                            backend=backends["simulator"])
    embedder = None
    if "embedding" in cfg.scorers:
        from workers.method.embedding import MiniLMEmbedder
        embedder = MiniLMEmbedder()
    probed: list = []

    async def process(records):
        if not probed:  # what an unconfigured endpoint can do decides the simulator mode: ask once, first
            probed.append(await asyncio.gather(explainer.probe_capabilities(), simulator.probe_capabilities()))
        return await explain_and_score(records, explainer, simulator, cfg, embedder=embedder)

    return process


def build_runner(cfg: SweepConfig, env: Mapping[str, str], *, mode: str = "method",
                 s3_options: dict | None = None) -> ShardRunner:
    store = RunStore.open(cfg.output, s3_options=s3_options)
    if mode.startswith("instant"):
        from testing.instant import InstantProcessor, SyntheticRecordSource
        delay = float(mode.partition(":")[2] or 0)
        return ShardRunner(cfg, store, InstantProcessor(cfg, delay), SyntheticRecordSource(cfg))
    if mode == "stub":  # the real method against an instant rule-following backend, on synthetic records
        from testing.instant import SyntheticRecordSource
        from workers.llm.client import LLMClient
        from workers.method.neuron import explain_and_score
        from testing.stubs import RuleStubBackend

        explainer, simulator = (LLMClient(RuleStubBackend(), role=role, on_call=record_call)
                                for role in ("explainer", "simulator"))

        async def process(records):
            return await explain_and_score(records, explainer, simulator, cfg)
        return ShardRunner(cfg, store, process, SyntheticRecordSource(cfg, full=True))
    from workers.llm.journal import CallJournal

    journal = CallJournal(journal_path(cfg, store))
    if not store.is_local:  # a fresh node: learn the calls that committed shards already paid for
        calls = store.read_table("calls")
        if calls.num_rows:
            journal.import_rows(calls.to_pylist())
    return ShardRunner(cfg, store, method_processor(cfg, env, journal), StoreRecordSource(store), journal=journal)


class ActorMetrics:
    """What each ShardActor reports through Ray's own metrics agent (`ray_neuronsweep_actor_*` on every node's
    metrics port), so per-node throughput is visible even before the driver counts a shard's summary."""

    def __init__(self):
        from ray.util.metrics import Counter, Histogram

        self.neurons = Counter("neuronsweep_actor_neurons", "Neurons finished by this actor", tag_keys=("status",))
        self.requests = Counter("neuronsweep_actor_api_requests", "LLM requests made by this actor",
                                tag_keys=("role", "status"))
        self.shard_seconds = Histogram("neuronsweep_actor_shard_duration_seconds", "Wall time of one shard",
                                       boundaries=[0.1, 0.5, 1, 5, 10, 30, 60, 300, 900])

    def record(self, summary: dict) -> None:
        if summary.get("already_committed"):
            return
        for status in ("done", "failed", "skipped"):
            if summary[status]:
                self.neurons.inc(summary[status], tags={"status": status})
        for role, _provider, _model, status, n in summary.get("requests", []):
            self.requests.inc(n, tags={"role": role, "status": status})
        self.shard_seconds.observe(summary["elapsed_s"])


class ShardActor:
    """Thin Ray wrapper around ShardRunner (async: many shards and calls in flight per actor)."""

    def __init__(self, cfg_dict: dict, env: dict, mode: str, s3_options: dict | None):
        self.runner = build_runner(SweepConfig.from_dict(cfg_dict), env, mode=mode, s3_options=s3_options)
        self.metrics = ActorMetrics()

    async def run(self, layer: int, neurons: tuple, retry_failed: bool) -> dict:
        summary = await self.runner.run(Shard(layer, tuple(neurons)), retry_failed=retry_failed)
        self.metrics.record(summary)
        return summary

    async def ready(self) -> bool:
        return True


# --- the driver ----------------------------------------------------------------------------------------------------
@dataclass
class SweepOutcome:
    planned: int = 0
    done: int = 0
    failed: int = 0
    skipped: int = 0
    shards_committed: int = 0
    shards_total: int = 0
    shard_errors: list = field(default_factory=list)
    stopped_by_budget: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    elapsed_s: float = 0.0
    failures: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.shards_committed == self.shards_total and not self.stopped_by_budget


def required_secrets(cfg: SweepConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The API keys the configured backends need, checked before any work; only these reach the actors."""
    out = {}
    for role in ("explainer", "simulator"):
        b = getattr(cfg, role)
        if b.kind == "openai" and b.api_key_env:
            if not env.get(b.api_key_env):
                raise ConfigError(f"{role}.api_key_env: environment variable {b.api_key_env} is not set "
                                  f"(the {role} backend '{b.model}' needs an API key)")
            out[b.api_key_env] = env[b.api_key_env]
    return out


def committed_summaries(store: RunStore) -> dict[str, dict]:
    out = {}
    for path in store.list_files(MARKERS):
        name = path.rsplit("/", 1)[-1]
        if name.endswith(".json") and not name.startswith("_"):
            out[name[:-5]] = store.read_json(f"{MARKERS}/{name}")
    return out


def default_actor_count(cfg: SweepConfig, mode: str) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    if mode == "method" and "local" in (cfg.explainer.kind, cfg.simulator.kind):
        return 1  # a local LLM is CPU/GPU-bound; one copy per sweep on a laptop
    return max(1, min(cpus, 8))


def init_ray(cfg: SweepConfig) -> bool:
    """Join `cfg.ray_address` or start Ray in-process; returns whether we started it."""
    import ray

    if ray.is_initialized():
        return False
    kw = dict(address=cfg.ray_address, log_to_driver=False) if cfg.ray_address else dict(
        include_dashboard=False, log_to_driver=False)
    ray.init(**kw)
    return True


def run_sweep(cfg: SweepConfig, env: Mapping[str, str], *, retry_failed: bool = False, mode: str = "method",
              s3_options: dict | None = None, n_actors: int | None = None, metrics: SweepMetrics | None = None,
              on_progress: Callable[[SweepOutcome], None] | None = None,
              extract_progress=None) -> SweepOutcome:
    import ray

    instant = mode.startswith("instant") or mode == "stub"
    secrets = {} if instant else required_secrets(cfg, env)
    store = RunStore.open(cfg.output, s3_options=s3_options, create=True)
    if instant and not store.exists(EXTRACT_MARKER):  # synthetic records: the planner takes the shape from here
        from testing.instant import synthetic_shape

        n_layers, n_neurons = synthetic_shape(cfg)
        store.write_json(EXTRACT_MARKER, {"model": {"name": IMPORTED, "n_layers": n_layers,
                                                    "n_neurons": n_neurons}, "synthetic": True})
    plan = prepare_run(cfg, store)
    metrics = metrics or SweepMetrics()
    _set_limits(metrics, cfg)
    metrics.neurons_planned.set(plan.n_neurons)
    metrics.shards_planned.set(len(plan.shards))

    started_ray = init_ray(cfg)
    try:
        if not store.exists(EXTRACT_MARKER):
            from orchestrator.extraction import run_extraction
            metrics.queue_depth.labels("extract").set(1)
            run_extraction(cfg, store, progress=extract_progress, metrics=metrics)
            metrics.queue_depth.labels("extract").set(0)
        return _explain_stage(cfg, store, plan, secrets, retry_failed=retry_failed, mode=mode,
                              s3_options=s3_options, n_actors=n_actors, metrics=metrics, on_progress=on_progress)
    finally:
        if started_ray:
            ray.shutdown()


def _explain_stage(cfg, store, plan: Plan, secrets, *, retry_failed, mode, s3_options, n_actors, metrics,
                   on_progress) -> SweepOutcome:
    import ray

    t0 = time.monotonic()
    out = SweepOutcome(planned=plan.n_neurons, shards_total=len(plan.shards))
    committed = committed_summaries(store)
    for s in committed.values():
        _count(out, s, metrics, fresh=False)
    todo = [sh for sh in plan.shards if sh.shard_id not in committed
            or (retry_failed and committed[sh.shard_id].get("failed"))]
    if retry_failed:
        for sh in todo:
            prev = committed.get(sh.shard_id)
            if prev:  # its failed neurons are about to be redone: take them out of the tally
                out.failed -= prev["failed"]
                out.done -= prev["done"]
                out.skipped -= prev["skipped"]
                out.shards_committed -= 1
    budget_reason = _over_budget(cfg, out)
    if budget_reason:
        todo = []
        out.stopped_by_budget = budget_reason
    if not todo:
        out.elapsed_s = time.monotonic() - t0
        return out

    n = n_actors or default_actor_count(cfg, mode)
    limiters = _shared_limiters(cfg) if mode == "method" else []  # owned by the driver
    local_llm = mode == "method" and "local" in (cfg.explainer.kind, cfg.simulator.kind)
    actor_cls = ray.remote(ShardActor).options(
        num_cpus=1 if local_llm else 0.25, max_restarts=-1, max_task_retries=-1,
        max_concurrency=max(64, cfg.max_inflight_shards * 4))
    cfg_dict = cfg.model_dump(mode="json")
    actors = [actor_cls.remote(cfg_dict, dict(secrets), mode, s3_options) for _ in range(n)]
    per_actor = cfg.max_inflight_shards
    pending: dict = {}
    queue = list(todo)
    next_actor = 0
    done_this_run = 0
    try:
        while queue or pending:
            while queue and len(pending) < per_actor * n and not out.stopped_by_budget:
                sh = queue.pop(0)
                ref = actors[next_actor % n].run.remote(sh.layer, sh.neurons, retry_failed)
                next_actor += 1
                pending[ref] = sh
            if out.stopped_by_budget:
                queue.clear()
            metrics.queue_depth.labels("explain").set(len(queue) + len(pending))
            if not pending:
                break
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            for ref in ready:
                sh = pending.pop(ref)
                try:
                    summary = ray.get(ref)
                except Exception as e:  # noqa: BLE001 - a shard that could not commit; the rest go on
                    out.shard_errors.append((sh.shard_id, f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"))
                    continue
                _count(out, summary, metrics, fresh=not summary.get("already_committed"))
                done_this_run += summary["n"]
                reason = _over_budget(cfg, out)
                if reason and queue:
                    out.stopped_by_budget = reason
            elapsed = time.monotonic() - t0
            rate = done_this_run / elapsed if elapsed > 0 else 0.0
            remaining = out.planned - (out.done + out.failed + out.skipped)
            metrics.eta.set(remaining / rate if rate > 0 else 0)
            if on_progress:
                on_progress(out)
    finally:
        for a in actors:
            ray.kill(a)
    out.elapsed_s = time.monotonic() - t0
    metrics.queue_depth.labels("explain").set(0)
    del limiters
    return out


def _shared_limiters(cfg: SweepConfig) -> list:
    """Create the cluster-wide rate limiter actors here, so they live as long as the driver (an actor that
    created one would take it down with it); the API actors find them by name."""
    from workers.llm.client import shared_limiter_for

    return [shared_limiter_for(getattr(cfg, role), use_ray=True) for role in ("explainer", "simulator")
            if getattr(cfg, role).kind != "local"]


def _count(out: SweepOutcome, s: dict, metrics: SweepMetrics, *, fresh: bool) -> None:
    out.done += s["done"]
    out.failed += s["failed"]
    out.skipped += s["skipped"]
    out.shards_committed += 1
    out.prompt_tokens += s["prompt_tokens"]
    out.completion_tokens += s["completion_tokens"]
    out.cost_usd += s["cost_usd"]
    for reason, k in s.get("failures", {}).items():
        out.failures[reason] = out.failures.get(reason, 0) + k
    if not fresh:
        return
    metrics.shards_committed.inc()
    for status in ("done", "failed", "skipped"):
        metrics.neurons.labels(status).inc(s[status])
    for reason, k in s.get("failures", {}).items():
        metrics.failures.labels(reason).inc(k)
    metrics.cost.inc(s["cost_usd"])
    for role, provider, model, status, k in s.get("requests", []):
        metrics.api_requests.labels(role, provider, model, status).inc(k)
    for role, provider, model, kind, k in s.get("tokens", []):
        metrics.api_tokens.labels(role, provider, model, kind).inc(k)
    for role, seconds in s.get("latencies", []):
        metrics.api_latency.labels(role).observe(seconds)
    for role, seconds in s.get("waits", []):
        metrics.limiter_wait.labels(role).observe(seconds)


def _over_budget(cfg: SweepConfig, out: SweepOutcome) -> str | None:
    b = cfg.budget
    tokens = out.prompt_tokens + out.completion_tokens
    if b.max_tokens is not None and tokens >= b.max_tokens:
        return f"token budget reached ({tokens:,} >= budget.max_tokens={b.max_tokens:,})"
    if b.max_cost_usd is not None and out.cost_usd >= b.max_cost_usd:
        return f"cost budget reached (${out.cost_usd:.4f} >= budget.max_cost_usd=${b.max_cost_usd:g})"
    return None


def _set_limits(metrics: SweepMetrics, cfg: SweepConfig) -> None:
    for role in ("explainer", "simulator"):
        b = getattr(cfg, role)
        metrics.tpm_limit.labels(role, b.kind, b.model).set(b.tokens_per_minute)
        metrics.rpm_limit.labels(role, b.kind, b.model).set(b.requests_per_minute)
