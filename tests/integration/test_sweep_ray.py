"""The pipeline on a local Ray cluster with the instant method: completeness, resume, budget, S3, metrics."""
import json
import threading
import time
from pathlib import Path

import pytest

from orchestrator.metrics import SweepMetrics
from orchestrator.pipeline import run_sweep
from orchestrator.results.reader import RunReader
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.layout import MARKERS_DIR
from support.localnet import free_port, scrape
from testing.instant import InstantRunnerFactory, prepare_synthetic_run

pytestmark = pytest.mark.usefixtures("ray_local")


@pytest.fixture(scope="module", autouse=True)
def s3_keys_in_the_workers_environment():
    """The actors read S3 keys from their own environment, never from their arguments: the moto server's keys must
    be in this process's environment before the module's local Ray starts (its workers inherit it)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv("AWS_ACCESS_KEY_ID", "test")
        m.setenv("AWS_SECRET_ACCESS_KEY", "test")
        yield

INSTANT = InstantRunnerFactory()
LAYERS, NEURONS = 3, 40  # 120 neurons in 9 shards of at most 16


def cfg_for(out, s3_options=None, **kw):
    cfg = SweepConfig.from_dict({"output": str(out), "shard_size": 16, "metrics_port": 0, **kw})
    prepare_synthetic_run(cfg, LAYERS, NEURONS, s3_options=s3_options)
    return cfg


def assert_one_row_per_neuron(store, planned):
    for table in ("ledger", "explanations", "scores"):
        t = store.read_table(table, columns=["layer", "neuron"])
        keys = list(zip(t.column("layer").to_pylist(), t.column("neuron").to_pylist()))
        assert len(keys) == len(set(keys)) == planned, table


def test_every_planned_neuron_gets_exactly_one_row(tmp_path, capsys):
    cfg = cfg_for(tmp_path / "run")
    o = run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=2)
    assert (o.planned, o.done, o.shards_committed, o.shards_total) == (120, 120, 9, 9) and o.complete
    store = RunStore.open(cfg.output)
    assert_one_row_per_neuron(store, 120)
    again = run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=2)  # a finished run: nothing to do
    assert again.done == 120 and again.complete
    assert_one_row_per_neuron(store, 120)
    p = RunReader(store).progress()
    assert (p.done, p.pending, p.shards_committed, p.n_shards) == (120, 0, 9, 9)
    assert p.prompt_tokens == 120 * 14000
    # `status` reads the shards' markers back (their summaries) for the throughput
    from orchestrator.cli.app import main
    capsys.readouterr()
    assert main(["status", cfg.output, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["done"] == 120 and st["wall_s"] > 0 and st["neurons_per_s"] == pytest.approx(120 / st["wall_s"])


def test_budget_stops_scheduling_and_resume_continues(tmp_path):
    cfg = cfg_for(tmp_path / "run", max_inflight_shards=1, budget={"max_tokens": 100_000},
                  explainer={"price_input_per_mtok": 1.0})
    o = run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=1)
    assert o.stopped_by_budget and "budget.max_tokens=100,000" in o.stopped_by_budget
    assert 0 < o.shards_committed < 9 and not o.complete
    assert o.cost_usd == pytest.approx(o.done * 2000 / 1e6)
    # a tally already over budget schedules nothing
    stuck = run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=1)
    assert stuck.stopped_by_budget and stuck.shards_committed == o.shards_committed
    done = run_sweep(cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"max_tokens": None})}), {},
                     runner_factory=INSTANT, n_actors=1)
    assert done.complete and done.done == 120
    assert_one_row_per_neuron(RunStore.open(cfg.output), 120)


PER_NEURON_USD = 2000 * 1.0 / 1e6  # testing/instant.py's explainer prompt tokens at $1 per million


def test_retry_failed_counts_each_paid_call_once(tmp_path, capsys):
    """Three neurons fail (after paying their tokens); --retry-failed redoes them: the driver, the ledger,
    `status` and the metrics all count 123 neurons' spend (120 + the 3 failed attempts), and the done counter
    rises by the 3 redone neurons, not by their shards' 48."""
    cfg = cfg_for(tmp_path / "run", explainer={"price_input_per_mtok": 1.0})
    failing = frozenset({(0, 3), (1, 17), (2, 39)})  # one in each of three shards
    first = run_sweep(cfg, {}, runner_factory=InstantRunnerFactory(fail=failing), n_actors=2)
    assert (first.done, first.failed, first.failures) == (117, 3, {"malformed": 3})
    assert first.cost_usd == pytest.approx(120 * PER_NEURON_USD)
    metrics = SweepMetrics()
    again = run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=2, retry_failed=True, metrics=metrics)
    assert (again.done, again.failed, again.failures, again.shards_committed) == (120, 0, {}, 9) and again.complete
    assert again.cost_usd == pytest.approx(123 * PER_NEURON_USD)
    assert again.prompt_tokens == 123 * 14000
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for m in metrics.registry.collect()
               for s in m.samples}
    assert samples[("neuronsweep_neurons_total", (("status", "done"),))] == 3
    assert samples[("neuronsweep_estimated_cost_dollars_total", ())] == pytest.approx(3 * PER_NEURON_USD)
    assert samples[("neuronsweep_shards_committed_total", ())] == 0  # three shards committed again, none new
    store = RunStore.open(cfg.output)
    ledger = store.read_table("ledger").to_pylist()
    assert len(ledger) == 123 and sum(r["cost_usd"] for r in ledger) == pytest.approx(123 * PER_NEURON_USD)
    assert sorted((r["layer"], r["neuron"]) for r in ledger if r["status"] == "failed") == sorted(failing)
    from orchestrator.cli.app import main
    capsys.readouterr()
    assert main(["status", cfg.output, "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert (st["done"], st["failed"]) == (120, 0) and st["cost_usd"] == pytest.approx(123 * PER_NEURON_USD)


def test_a_shard_that_kills_its_actor_every_time_ends_failed_and_the_sweep_goes_on(tmp_path):
    """Neuron 20 of layer 1 kills the process running it, every time. After `max_shard_crashes` deaths its
    shard (layer 1, neurons 16-31) is recorded as failed (worker_crash); the shards that shared an actor with it
    when it died are redone and commit; the sweep ends."""
    cfg = cfg_for(tmp_path / "run", max_shard_crashes=2, max_inflight_shards=2)
    factory = InstantRunnerFactory(delay_s=0.01, crash=frozenset({(1, 20)}))
    result = []
    t = threading.Thread(target=lambda: result.append(run_sweep(cfg, {}, runner_factory=factory, n_actors=2)),
                         daemon=True)
    t.start()
    t.join(timeout=240)
    assert not t.is_alive(), "the sweep kept retrying the shard that kills its actor"
    o = result[0]
    assert o.complete and not o.shard_errors
    assert (o.done, o.failed, o.failures) == (104, 16, {"worker_crash": 16})
    ledger = RunStore.open(cfg.output).read_table("ledger").to_pylist()
    crashed = [r for r in ledger if r["status"] == "failed"]
    assert sorted(r["neuron"] for r in crashed) == list(range(16, 32)) and {r["layer"] for r in crashed} == {1}
    assert all(r["reason"] == "worker_crash" and r["attempts"] == 2 and "died 2 times" in r["error"]
               for r in crashed)
    assert len(ledger) == 120


def test_s3_output_against_a_local_s3_server(tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = {"endpoint_override": f"{host}:{port}", "scheme": "http", "access_key": "test", "secret_key": "test",
              "region": "us-east-1", "allow_bucket_creation": True}
        import pyarrow.fs as pafs
        # moto keeps its buckets in process-wide state: a bucket of this test's own, never another test's leftovers
        bucket = f"sweeps-{tmp_path.name.lower().replace('_', '-')[-40:]}"
        pafs.S3FileSystem(**s3).create_dir(bucket)
        cfg = cfg_for(f"s3://{bucket}/run1", s3_options=s3)
        o = run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=2, s3_options=s3)
        assert o.complete and o.done == 120
        store = RunStore.open(f"s3://{bucket}/run1", s3_options=s3)
        assert_one_row_per_neuron(store, 120)
        assert len(store.list_files(MARKERS_DIR)) == 9
        assert not [p for p in store.list_files("") if "_tmp" in p]
        again = run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=2, s3_options=s3)  # resume reads S3 markers
        assert again.complete
        assert_one_row_per_neuron(store, 120)
    finally:
        server.stop()


DONE = ("neuronsweep_neurons_total", frozenset({("status", "done")}))


def metric(samples, name):
    return samples[(name, frozenset())]


def wait_for(predicate, timeout=120, what=""):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def test_metrics_move_during_a_sweep(tmp_path):
    """Layer 0's neurons run, the later layers wait at a gate the test holds shut: the driver's endpoint must
    then show exactly layer 0 as done while the sweep is in flight, and everything once the gate opens."""
    port = free_port()
    metrics = SweepMetrics()
    server, _ = metrics.serve(port, addr="127.0.0.1")
    gate = tmp_path / "gate-open"
    cfg = cfg_for(tmp_path / "run", max_inflight_shards=1, explainer={"price_input_per_mtok": 2.0})
    factory = InstantRunnerFactory(gate_file=str(gate), gate_from_layer=1)
    seen = []
    t = threading.Thread(target=lambda: seen.append(run_sweep(cfg, {}, runner_factory=factory, n_actors=1,
                                                              metrics=metrics)))
    t.start()
    try:
        url = f"http://127.0.0.1:{port}/metrics"
        wait_for(lambda: scrape(url).get(DONE, 0) >= NEURONS, what="layer 0 to be counted")
        held = scrape(url)
        assert held[DONE] == NEURONS and metric(held, "neuronsweep_shards_committed_total") == 3  # layer 0 only
        assert RunStore.open(cfg.output).read_table("ledger").num_rows == NEURONS and t.is_alive()
    finally:
        gate.touch()
        t.join(timeout=120)
    final = scrape(f"http://127.0.0.1:{port}/metrics")
    server.shutdown()
    assert seen and seen[0].complete
    assert final[DONE] == 120
    assert metric(final, "neuronsweep_neurons_planned") == 120
    assert metric(final, "neuronsweep_shards_committed_total") == 9
    assert metric(final, "neuronsweep_estimated_cost_dollars_total") == pytest.approx(120 * 2000 * 2.0 / 1e6)


def test_actors_report_through_ray_metrics(tmp_path, ray_local):
    """ShardActors export `ray_neuronsweep_actor_*` through Ray's per-node metrics endpoint, labelled with their
    run, so this sweep's count is its own whatever other sweeps ran on the cluster."""
    import urllib.request

    port = ray_local._private.worker.global_worker.node.metrics_export_port
    cfg = cfg_for(tmp_path / "run")
    run_sweep(cfg, {}, runner_factory=INSTANT, n_actors=1)
    label = f'run="{cfg.output}"'

    def done_count() -> float:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        return sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                   if line.startswith("ray_neuronsweep_actor_neurons_total{") and 'status="done"' in line
                   and label in line)

    wait_for(lambda: done_count() >= 120, timeout=60, what="the actors' counts to be exported")
    assert done_count() == 120


def test_ray_workers_import_testing_and_see_the_test_model_sources(ray_local):
    """Ray workers of a local cluster import `testing` (Ray hands them the driver's sys.path) and serve the
    `tiny-` models (they inherit NEURONSWEEP_MODEL_SOURCES from the driver's environment)."""
    @ray_local.remote
    def in_a_worker():
        import os

        from workers.models.loading import model_info
        return os.getpid(), model_info("tiny-gpt2").n_neurons

    pid, width = ray_local.get(in_a_worker.remote())
    import os
    assert pid != os.getpid() and width == 64


def test_without_an_address_the_driver_starts_its_own_ray_beside_a_running_cluster(ray_local):
    """Ray's plain `ray.init()` joins the cluster that `ray start` (or `ray.cluster_utils.Cluster`) last started on
    the machine, named in $RAY_TMPDIR/ray/ray_current_cluster; with no --address and no RAY_ADDRESS the driver
    must start its own (a CPU-less test cluster running beside a CLI sweep once left its extraction actors
    unschedulable). The file here names this module's live cluster."""
    import os
    import subprocess
    import sys
    import tempfile

    theirs = ray_local.get_runtime_context().gcs_address
    with tempfile.TemporaryDirectory(prefix="ns-ray-", dir="/tmp") as tmp:  # short: Ray's socket paths
        (Path(tmp) / "ray").mkdir()
        (Path(tmp) / "ray" / "ray_current_cluster").write_text(theirs)
        code = ("import ray\nfrom orchestrator.ray_session import init_ray\nfrom schemas.config import SweepConfig\n"
                "assert init_ray(SweepConfig())\nprint(ray.get_runtime_context().gcs_address)\nray.shutdown()\n")
        env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_TMPDIR": tmp}
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=180,
                           cwd=Path(__file__).resolve().parents[2])
    assert r.returncode == 0, r.stderr[-2000:]
    ours = r.stdout.strip().splitlines()[-1]
    assert ours and ours != theirs, (ours, theirs)
