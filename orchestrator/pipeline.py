"""The sweep on Ray Core: extraction, then explain -> simulate -> score per shard on async actors.

The driver keeps at most `max_inflight_shards` shards per actor in flight (`ray.wait`), so its memory stays
flat whatever the number of neurons; it only ever holds shard summaries. Actors restart on failure
(`max_restarts=-1`) and the driver resubmits the shards they were running (`max_task_retries=0`: it counts the
deaths itself): a shard is idempotent (deterministic file names, marker last, calls answered from the
journal), so a retried shard neither duplicates rows nor pays twice. A shard whose actor died while running
it runs alone afterwards (placement.py); after `max_shard_crashes` deaths its neurons are recorded as failed
(`worker_crash`) and the sweep goes on. The run directory, not Ray, is the source of truth: a new driver lists
the markers and schedules only what is missing.

What an actor runs comes from a runner factory (`RunnerFactory`): the real method (`MethodRunnerFactory`, the
default) or a test double from `testing/` (an instant method, the method against a stub backend); the driver
asks the factory whether it calls the configured LLM backends (API keys, shared rate limiters) and whether it
holds a local LLM (a whole CPU per actor).
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from orchestrator.lease import DEFAULT_STALE_AFTER_S, RunLease, lease_token
from orchestrator.metrics import SweepMetrics
from orchestrator.placement import ActorSlots
from orchestrator.plan import Plan, Shard, prepare_run
from orchestrator.ray_session import init_ray
from orchestrator.shards import (
    NeuronProcessor,
    ShardRunner,
    ShardSummary,
    StoreRecordSource,
    added_by,
    record_call,
)
from orchestrator.store import RunStore, with_env_credentials, without_secrets
from schemas.config import ConfigError, SweepConfig
from schemas.failures import FailureReason
from schemas.layout import EXTRACT_MARKER, JOURNAL_FILE, MARKERS_DIR, marker_shard_id, shard_marker

if TYPE_CHECKING:
    from workers.llm.backends.base import LLMBackend
    from workers.method.neuron import NeuronResult
    from workers.method.records import NeuronRecords


# --- what a ShardActor runs --------------------------------------------------------------------------------------
def journal_path(cfg: SweepConfig, store: RunStore, cache_dir: Path | None = None) -> Path:
    """The call journal is a local SQLite file: inside a local run directory, else in a local cache keyed by
    the run URI (an object store cannot host SQLite; committed shards also carry their calls in `calls/`)."""
    if store.is_local:
        return Path(store.root) / JOURNAL_FILE
    digest = hashlib.sha256(cfg.output.encode()).hexdigest()[:16]
    return (cache_dir or Path.home() / ".cache" / "neuronsweep" / "journal") / f"{digest}.sqlite"


@dataclass
class MethodProcessor:
    """A `NeuronProcessor` (`process`) that also names the local models it holds (`local_backends`), whose
    measured service the driver reads for its estimate of the sweep's time (ShardActor.live)."""
    process: NeuronProcessor
    local_backends: list[LLMBackend]

    def __call__(self, records: NeuronRecords) -> Coroutine[Any, Any, NeuronResult]:
        return self.process(records)


def method_processor(cfg: SweepConfig, env: Mapping[str, str], journal) -> MethodProcessor:
    """The published method through our LLM clients (journal, retries, shared rate limiter)."""
    from workers.llm.backends import make_backend
    from workers.llm.client import make_client
    from workers.method.neuron import explain_and_score

    shared: dict[tuple, LLMBackend] = {}  # by model: explainer and simulator share one local model in memory
    backends: dict[str, LLMBackend] = {}  # by role
    for role in ("explainer", "simulator"):
        b = getattr(cfg, role)
        key = (b.kind, b.model, b.dtype, b.max_batch) if b.kind == "local" else (role,)
        if key not in shared:
            shared[key] = make_backend(b, env=env)
        backends[role] = shared[key]
    explainer = make_client(cfg.explainer, env=env, role="explainer", journal=journal, on_call=record_call,
                            backend=backends["explainer"])
    simulator = make_client(cfg.simulator, env=env, role="simulator", journal=journal, on_call=record_call,
                            backend=backends["simulator"])
    embedder = None
    if "embedding" in cfg.scorers:
        from workers.method.embedding import MiniLMEmbedder
        embedder = MiniLMEmbedder()
    probed: list = []

    async def process(records: NeuronRecords) -> NeuronResult:
        if not probed:  # what an unconfigured endpoint can do decides the simulator mode: ask once, first
            probed.append(await asyncio.gather(explainer.probe_capabilities(), simulator.probe_capabilities()))
        return await explain_and_score(records, explainer, simulator, cfg, embedder=embedder)

    # their measured service, for the driver's estimate of the sweep's time (ShardActor.live)
    return MethodProcessor(process, list({id(b): b for b in shared.values() if b.provider == "local"}.values()))


class RunnerFactory:
    """Builds the `ShardRunner` each ShardActor runs. Ray pickles the factory to every actor, whose constructor
    calls it, so a factory is a small plain object; the driver reads the two facts below before any actor starts."""

    calls_configured_backends: bool = True  # the cfg's explainer/simulator: keys checked, rate limiters shared

    def holds_local_llm(self, cfg: SweepConfig) -> bool:
        """Whether each runner keeps an LLM in its own process (CPU/GPU-bound: a whole CPU per actor)."""
        return "local" in (cfg.explainer.kind, cfg.simulator.kind)

    def __call__(self, cfg: SweepConfig, env: Mapping[str, str], store: RunStore) -> ShardRunner:
        raise NotImplementedError


class MethodRunnerFactory(RunnerFactory):
    """The published method through our LLM clients, on the records in the run directory."""

    def __call__(self, cfg: SweepConfig, env: Mapping[str, str], store: RunStore) -> ShardRunner:
        from workers.llm.journal import CallJournal

        journal = CallJournal(journal_path(cfg, store))
        if not store.is_local:  # a fresh node: learn the calls that shards already paid for (committed or not)
            calls = store.read_table("calls", include_uncommitted=True)
            if calls.num_rows:
                journal.import_rows(calls.to_pylist())
        return ShardRunner(cfg, store, method_processor(cfg, env, journal), StoreRecordSource(store),
                           journal=journal)


def build_runner(cfg: SweepConfig, env: Mapping[str, str], *, runner_factory: RunnerFactory | None = None,
                 s3_options: dict | None = None) -> ShardRunner:
    store = RunStore.open(cfg.output, s3_options=s3_options)
    return (runner_factory or MethodRunnerFactory())(cfg, env, store)


class ActorMetrics:
    """What each ShardActor reports through Ray's own metrics agent (`ray_neuronsweep_actor_*` on every node's
    metrics port), so per-node throughput is visible even before the driver counts a shard's summary. Every
    series carries the run (its output URI, as the driver's build_info does): sweeps that share a cluster, one
    after another or at once, stay apart."""

    def __init__(self, run: str):
        from ray.util.metrics import Counter, Histogram

        self.neurons = Counter("neuronsweep_actor_neurons", "Neurons finished by this actor",
                               tag_keys=("status", "run"))
        self.requests = Counter("neuronsweep_actor_api_requests", "LLM requests made by this actor",
                                tag_keys=("role", "status", "run"))
        self.shard_seconds = Histogram("neuronsweep_actor_shard_duration_seconds", "Wall time of one shard",
                                       boundaries=[0.1, 0.5, 1, 5, 10, 30, 60, 300, 900], tag_keys=("run",))
        for metric in (self.neurons, self.requests, self.shard_seconds):
            metric.set_default_tags({"run": run})

    def record(self, summary: ShardSummary) -> None:
        if summary.already_committed:
            return
        summary = added_by(summary, summary.previous)
        for status in ("done", "failed", "skipped"):
            if getattr(summary, status):
                self.neurons.inc(getattr(summary, status), tags={"status": status})
        for role, _provider, _model, status, n in summary.requests:
            self.requests.inc(n, tags={"role": role, "status": status})
        self.shard_seconds.observe(summary.elapsed_s)


class ShardActor:
    """Thin Ray wrapper around ShardRunner (async: many shards and calls in flight per actor).

    It is given no secret (Ray keeps an actor's arguments): API keys, S3 keys and the credentials of an endpoint
    URL come from its own process environment (`actor_config`, `config_in_actor`). A missing one is reported by
    `ready` as one line, not as a dead actor."""

    def __init__(self, cfg_dict: dict, runner_factory: RunnerFactory, s3_options: dict | None,
                 lease_token: str | None = None):
        env = dict(os.environ)
        self.error: str | None = None
        try:
            cfg = config_in_actor(cfg_dict, env)
            self.runner = build_runner(cfg, env, runner_factory=runner_factory,
                                       s3_options=with_env_credentials(s3_options, env))
        except ConfigError as e:
            self.error = str(e)
            return
        self.runner.lease_token = lease_token
        self.metrics = ActorMetrics(cfg.output)

    async def run(self, layer: int, neurons: tuple, retry_failed: bool, retry_of: int | None = None) -> ShardSummary:
        if self.error:
            raise ConfigError(self.error)
        summary = await self.runner.run(Shard(layer, tuple(neurons)), retry_failed=retry_failed, retry_of=retry_of)
        self.metrics.record(summary)
        return summary

    async def ready(self) -> str | None:
        """None, or why this actor cannot run shards (a secret missing from its environment)."""
        return self.error

    async def live(self) -> dict:
        """Between commits, for the driver's progress: neurons finished in shards not committed yet, and the
        measurements of the local models this actor holds (orchestrator/progress.py)."""
        runner = getattr(self, "runner", None)
        if runner is None:
            return {}
        backends = getattr(runner.processor, "local_backends", [])
        return {"finished": dict(runner.finished), "model": [b.stats.snapshot() for b in backends]}


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
    live: object = None  # orchestrator.progress.Live: the actors' state between commits, while the sweep runs

    @property
    def complete(self) -> bool:
        return self.shards_committed == self.shards_total and not self.stopped_by_budget


def required_secrets(cfg: SweepConfig, env: Mapping[str, str]) -> dict[str, str]:
    """The API keys the configured backends need, checked before any work (the actors read them from their own
    environment)."""
    out = {}
    for role in ("explainer", "simulator"):
        b = getattr(cfg, role)
        if b.kind == "openai" and b.api_key_env:
            if not env.get(b.api_key_env):
                raise ConfigError(f"{role}.api_key_env: environment variable {b.api_key_env} is not set "
                                  f"(the {role} backend '{b.model}' needs an API key)")
            out[b.api_key_env] = env[b.api_key_env]
    return out


URL_ENV = "NEURONSWEEP_{role}_BASE_URL"  # the full URL of an endpoint whose base_url carries credentials


def _url_env(role: str) -> str:
    return URL_ENV.format(role=role.upper())


def actor_config(cfg: SweepConfig) -> dict:
    """The config as the actors get it: endpoint URLs without their credentials (the actors take the full URL from
    `NEURONSWEEP_<ROLE>_BASE_URL` in their environment, see `config_in_actor`)."""
    from orchestrator.plan import stored_config

    return stored_config(cfg)


def url_secrets_env(cfg: SweepConfig) -> dict[str, str]:
    """`NEURONSWEEP_<ROLE>_BASE_URL` -> full URL, for each endpoint whose base_url carries credentials."""
    from workers.llm.redact import url_secrets

    return {_url_env(role): getattr(cfg, role).base_url for role in ("explainer", "simulator")
            if getattr(cfg, role).base_url and url_secrets(getattr(cfg, role).base_url)}


def config_in_actor(cfg_dict: dict, env: Mapping[str, str]) -> SweepConfig:
    """`actor_config`'s output with each endpoint's credentials back, from the environment; the URL there must be
    the configured endpoint (only its credentials may differ), so no environment can redirect a key."""
    from workers.llm.redact import HIDDEN, redact_url

    data = {**cfg_dict}
    for role in ("explainer", "simulator"):
        url = (data.get(role) or {}).get("base_url")
        if not url or HIDDEN not in url:
            continue
        var = _url_env(role)
        full = env.get(var)
        if not full:
            raise ConfigError(f"{role}.base_url carries credentials, which are never passed to Ray actors: set "
                              f"{var} to the full URL in the environment of the cluster's workers")
        if redact_url(full) != url:
            raise ConfigError(f"{var} names {redact_url(full)}, not the configured {role}.base_url {url}")
        data[role] = {**data[role], "base_url": full}
    return SweepConfig.from_dict(data)


def committed_summaries(store: RunStore) -> dict[str, ShardSummary]:
    """shard id -> summary, for every committed shard of the run."""
    out = {}
    for path in store.list_files(MARKERS_DIR):
        shard_id = marker_shard_id(path)
        if shard_id is not None:
            out[shard_id] = ShardSummary.from_json(store.read_json(shard_marker(shard_id)))
    return out


def default_actor_count(cfg: SweepConfig, runner_factory: RunnerFactory) -> int:
    import ray

    cpus = int(ray.cluster_resources().get("CPU", 1))
    if runner_factory.holds_local_llm(cfg):
        return 1  # a local LLM is CPU/GPU-bound; one copy per sweep on a laptop
    return max(1, min(cpus, 8))


def run_sweep(cfg: SweepConfig, env: Mapping[str, str], *, runner_factory: RunnerFactory | None = None,
              retry_failed: bool = False, s3_options: dict | None = None, n_actors: int | None = None,
              metrics: SweepMetrics | None = None, on_progress: Callable[[SweepOutcome], None] | None = None,
              extract_progress=None, force_unlock: bool = False, lease_timeout_s: float = DEFAULT_STALE_AFTER_S,
              command: str = "run_sweep") -> SweepOutcome:
    """Extract (unless the run directory holds a finished extraction), then explain and score every planned
    shard not yet committed, with what `runner_factory` builds (default: the real method). The whole sweep holds
    the run's lease (lease.py): a second driver on the same run is refused; `force_unlock` removes another's."""
    runner_factory = runner_factory or MethodRunnerFactory()
    secrets = required_secrets(cfg, env) if runner_factory.calls_configured_backends else {}
    store = RunStore.open(cfg.output, s3_options=s3_options, create=True)
    with RunLease(store, command=command, s3_options=s3_options, stale_after_s=lease_timeout_s).acquire(
            force=force_unlock) as lease:
        store.remove_temporary_files()  # a crashed writer's; no one else writes while we hold the lease
        return _leased_sweep(cfg, store, lease, {**secrets, **url_secrets_env(cfg)}, runner_factory=runner_factory,
                             retry_failed=retry_failed, s3_options=s3_options, n_actors=n_actors, metrics=metrics,
                             on_progress=on_progress, extract_progress=extract_progress)


def _leased_sweep(cfg, store, lease: RunLease, secrets, *, runner_factory, retry_failed, s3_options, n_actors,
                  metrics, on_progress, extract_progress) -> SweepOutcome:
    import ray

    plan = prepare_run(cfg, store)
    metrics = metrics or SweepMetrics()
    _set_limits(metrics, cfg)
    metrics.neurons_planned.set(plan.n_neurons)
    metrics.shards_planned.set(len(plan.shards))

    started_ray = _init_ray_with(cfg, secrets)
    try:
        check_output_shared(cfg, store, lease.token)
        if not store.exists(EXTRACT_MARKER):
            from orchestrator.extraction import run_extraction
            metrics.queue_depth.labels("extract").set(1)
            run_extraction(cfg, store, progress=extract_progress, metrics=metrics)
            metrics.queue_depth.labels("extract").set(0)
        return _explain_stage(cfg, store, plan, lease, retry_failed=retry_failed, runner_factory=runner_factory,
                              s3_options=s3_options, n_actors=n_actors, metrics=metrics, on_progress=on_progress)
    finally:
        if started_ray:
            ray.shutdown()


def _init_ray_with(cfg: SweepConfig, secrets: Mapping[str, str]) -> bool:
    """`init_ray`; a local cluster started here inherits `secrets` in its processes' environment (where its actors
    read them), while this process's own environment is left as it was."""
    import ray

    if ray.is_initialized() or cfg.ray_address or not secrets:
        return init_ray(cfg)
    saved = {k: os.environ.get(k) for k in secrets}
    os.environ.update(secrets)
    try:
        return init_ray(cfg)
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_output_shared(cfg: SweepConfig, store: RunStore, token: str) -> None:
    """A run directory on a local path must be the same folder on every node of the cluster (a shared mount):
    each node looks for this driver's lease there. A node that does not see it would write to its own disk."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if not store.is_local or (not cfg.ray_address and len(nodes) <= 1):
        return
    probe = ray.remote(num_cpus=0, max_retries=0)(_lease_token_at)
    refs = {f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})": probe.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(cfg.output)
        for n in nodes}
    seen = {node: ray.get(ref, timeout=300) for node, ref in refs.items()}
    blind = sorted(node for node, t in seen.items() if t != token)
    if blind:
        raise ConfigError(
            f"output: {cfg.output} is a local path, and node {blind[0]} of the Ray cluster ({len(blind)} of "
            f"{len(seen)} nodes) does not see this run directory there: each node would write to its own disk. "
            f"Use an s3:// or gs:// output, or an absolute path on a file system every node mounts")


def _lease_token_at(output: str) -> str | None:
    return lease_token(RunStore.open(output))


def _explain_stage(cfg, store, plan: Plan, lease: RunLease, *, retry_failed, runner_factory: RunnerFactory, s3_options,
                   n_actors, metrics, on_progress) -> SweepOutcome:
    import ray

    t0 = time.monotonic()
    out = SweepOutcome(planned=plan.n_neurons, shards_total=len(plan.shards))
    committed = committed_summaries(store)
    for s in committed.values():
        _count(out, s, metrics, fresh=False)
    todo = [sh for sh in plan.shards if sh.shard_id not in committed
            or (retry_failed and committed[sh.shard_id].failed)]
    budget_reason = _over_budget(cfg, out)
    if budget_reason:
        todo = []
        out.stopped_by_budget = budget_reason
    if not todo:
        out.elapsed_s = time.monotonic() - t0
        return out
    retried = {sh.shard_id for sh in todo if sh.shard_id in committed}
    for shard_id in retried:  # their neurons are being redone: out of the counts (not the spend) until they return
        _add_counts(out, committed[shard_id], -1)

    n = n_actors or default_actor_count(cfg, runner_factory)
    limiters = _shared_limiters(cfg) if runner_factory.calls_configured_backends else []  # owned by the driver
    actor_cls = ray.remote(ShardActor).options(
        num_cpus=1 if runner_factory.holds_local_llm(cfg) else 0.25, max_restarts=-1, max_task_retries=0,
        max_concurrency=max(64, cfg.max_inflight_shards * 4))
    cfg_dict = actor_config(cfg)
    # Any: Ray types a handle as `ActorHandle[T] | type[T]`, whose methods are ShardActor's own (no `.remote`)
    actors: list[Any] = [actor_cls.remote(cfg_dict, runner_factory, without_secrets(s3_options), lease.token)
                         for _ in range(n)]
    _check_actors_ready(actors)
    from orchestrator.progress import LivePoller
    poller = LivePoller(actors)
    slots = ActorSlots(n, cfg.max_inflight_shards)
    pending: dict = {}  # ref -> (shard, actor index)
    queue = list(todo)
    suspects: list[Shard] = []  # shards whose actor died while running them: resubmitted alone (placement.py)
    deaths: Counter = Counter()  # shard id -> deaths of its actor while it ran
    probes: dict = {}  # ref -> actor index: a `ready` call to a restarting actor, which takes shards once answered
    reprobe: dict[int, float] = {}  # actor index -> when to ask again (it was still restarting)
    done_this_run = 0
    try:
        while queue or suspects or pending:
            lease.check()  # another driver took the run over: stop here
            for restarting, at in list(reprobe.items()):
                if at <= time.monotonic():
                    del reprobe[restarting]
                    probes[actors[restarting].ready.remote()] = restarting
            while not out.stopped_by_budget:
                target = slots.place(alone=True) if suspects else None
                if target is not None:
                    sh = suspects.pop(0)
                else:
                    target = slots.place() if queue else None
                    if target is None:
                        break
                    sh = queue.pop(0)
                prev = committed.get(sh.shard_id) if retry_failed else None
                ref = actors[target].run.remote(sh.layer, sh.neurons, retry_failed, prev.commit if prev else None)
                pending[ref] = (sh, target)
            if out.stopped_by_budget:
                queue.clear()
                suspects.clear()
            metrics.queue_depth.labels("explain").set(len(queue) + len(suspects) + len(pending))
            if not pending and not probes and not reprobe:
                for sh in queue + suspects:  # every actor failed to start: nothing can run them
                    out.shard_errors.append((sh.shard_id, "no shard actor could be started"))
                break
            ready, _ = ray.wait([*pending, *probes], num_returns=1, timeout=0.2 if reprobe else 1.0)
            for ref in ready:
                if ref in probes:
                    k = probes.pop(ref)
                    try:
                        ray.get(ref)
                        slots.mark_up(k)
                    except ray.exceptions.RayActorError as e:
                        if not e.actor_init_failed:  # still restarting; one that cannot start stays down
                            reprobe[k] = time.monotonic() + 0.2
                    continue
                sh, k = pending.pop(ref)
                slots.release(k)
                poller.forget(k)  # its live answers so far may count this shard's neurons, which it now reports
                prev = committed.get(sh.shard_id) if retry_failed else None
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    # the actor died (Ray restarts it): the driver, not Ray, retries the shard, so that a shard
                    # that kills its actor every time ends failed instead of looping forever
                    if k not in slots.down:
                        slots.mark_down(k)
                        probes[actors[k].ready.remote()] = k
                    if e.actor_init_failed:  # a factory that cannot build a runner: no retry can help
                        out.shard_errors.append((sh.shard_id, _one_line(e)))
                        continue
                    if _refused_while_restarting(e):  # sent after the death, never ran: not this shard's doing
                        (suspects if deaths[sh.shard_id] else queue).insert(0, sh)
                        continue
                    deaths[sh.shard_id] += 1
                    if deaths[sh.shard_id] < cfg.max_shard_crashes:
                        suspects.append(sh)
                        continue
                    summary = ShardRunner.committer(cfg, store).give_up(
                        sh, FailureReason.WORKER_CRASH, f"worker_crash: its actor died {deaths[sh.shard_id]} times "
                        f"while running this shard (last: {_one_line(e)})", attempts=deaths[sh.shard_id],
                        retry_of=prev.commit if prev else None)
                except Exception as e:  # noqa: BLE001 - a shard that could not commit; the rest go on
                    out.shard_errors.append((sh.shard_id, _one_line(e)))
                    continue
                _count(out, summary, metrics, fresh=not summary.already_committed, previous=prev)
                retried.discard(sh.shard_id)
                added = added_by(summary, prev)
                done_this_run += added.done + added.failed + added.skipped
                reason = _over_budget(cfg, out)
                if reason and (queue or suspects):
                    out.stopped_by_budget = reason
            elapsed = time.monotonic() - t0
            rate = done_this_run / elapsed if elapsed > 0 else 0.0
            remaining = out.planned - (out.done + out.failed + out.skipped)
            metrics.eta.set(remaining / rate if rate > 0 else 0)
            if on_progress:
                out.live = poller.poll()
                on_progress(out)
    finally:
        for a in actors:
            ray.kill(a)
    for shard_id in retried:  # retries that did not come back (budget, errors): their previous commit stands
        _add_counts(out, committed[shard_id], 1)
    out.elapsed_s = time.monotonic() - t0
    out.live = None  # everything finished is committed now (the last poll may predate a commit)
    metrics.queue_depth.labels("explain").set(0)
    del limiters
    return out


def _check_actors_ready(actors: list) -> None:
    """Raise a ConfigError if the actors cannot run shards (a secret missing from their environment)."""
    import ray

    try:
        errors = [e for e in ray.get([a.ready.remote() for a in actors]) if e]
    except ray.exceptions.RayActorError:
        return  # an actor died starting: the driver's loop counts and retries that like any death
    if errors:
        raise ConfigError(f"the shard actors cannot start: {errors[0]} (actors read secrets from their own "
                          f"environment: on a cluster, set them on every node, e.g. a Kubernetes secretKeyRef)")


def _shared_limiters(cfg: SweepConfig) -> list:
    """Create the cluster-wide rate limiter actors here, so they live as long as the driver (an actor that
    created one would take it down with it); the API actors find them by name."""
    from workers.llm.client import shared_limiter_for

    return [shared_limiter_for(getattr(cfg, role), use_ray=True) for role in ("explainer", "simulator")
            if getattr(cfg, role).kind != "local"]


def _refused_while_restarting(e: BaseException) -> bool:
    """Whether Ray refused a call because its actor was restarting (sent after a death the driver had not seen
    yet): the call never ran. Ray says so only in the message; were that wording to change, such a refusal
    would count as a death of the shard, which only brings its `max_shard_crashes` nearer."""
    import ray

    return isinstance(e, ray.exceptions.ActorUnavailableError) and "actor is restarting" in str(e)


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:300]}"


def _add_counts(out: SweepOutcome, s: ShardSummary, sign: int) -> None:
    """Add (sign 1) or take out (-1) a shard's neurons and its being committed; its spend is `_count`'s."""
    out.done += sign * s.done
    out.failed += sign * s.failed
    out.skipped += sign * s.skipped
    out.shards_committed += sign
    for reason, k in s.failures.items():
        out.failures[reason] = out.failures.get(reason, 0) + sign * k
    out.failures = {reason: k for reason, k in out.failures.items() if k}


def _count(out: SweepOutcome, s: ShardSummary, metrics: SweepMetrics, *, fresh: bool,
           previous: ShardSummary | None = None) -> None:
    """Count a shard's commit `s` in the tally, and what it added in the metrics when this run committed it
    (`fresh`). `previous`: the commit a retry replaced, whose neurons the driver took out of the tally when it
    scheduled the retry and whose spend stays counted: a summary's spend is its shard's total, so only the
    difference is new."""
    _add_counts(out, s, 1)
    base = previous or ShardSummary(s.shard_id, s.layer, s.n)
    out.prompt_tokens += s.prompt_tokens - base.prompt_tokens
    out.completion_tokens += s.completion_tokens - base.completion_tokens
    out.cost_usd += s.cost_usd - base.cost_usd
    if not fresh:
        return
    s = added_by(s, previous)
    if previous is None:  # a re-commit (--retry-failed) commits no new shard
        metrics.shards_committed.inc()
    for status in ("done", "failed", "skipped"):
        metrics.neurons.labels(status).inc(getattr(s, status))
    for reason, k in s.failures.items():
        metrics.failures.labels(reason).inc(k)
    metrics.cost.inc(s.cost_usd)
    for role, provider, model, status, k in s.requests:
        metrics.api_requests.labels(role, provider, model, status).inc(k)
    for role, provider, model, kind, k in s.tokens:
        metrics.api_tokens.labels(role, provider, model, kind).inc(k)
    for role, seconds in s.latencies:
        metrics.api_latency.labels(role).observe(seconds)
    for role, seconds in s.waits:
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
