"""The pipeline on a local Ray cluster with the instant method: completeness, resume, budget, S3, metrics."""
import threading
import time
import urllib.request

import pytest
import ray

from support.localnet import free_port, scrape
from orchestrator.metrics import SweepMetrics
from orchestrator.pipeline import run_sweep
from orchestrator.results.reader import RunReader
from orchestrator.store import RunStore
from schemas.config import SweepConfig


@pytest.fixture(scope="module", autouse=True)
def ray_local():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def cfg_for(out, **kw):
    return SweepConfig.from_dict({"model": {"name": "synthetic:3x40"}, "output": str(out), "shard_size": 16,
                                  "metrics_port": 0, **kw})


def assert_one_row_per_neuron(store, planned):
    for table in ("ledger", "explanations", "scores"):
        t = store.read_table(table, columns=["layer", "neuron"])
        keys = list(zip(t.column("layer").to_pylist(), t.column("neuron").to_pylist()))
        assert len(keys) == len(set(keys)) == planned, table


def test_every_planned_neuron_gets_exactly_one_row(tmp_path):
    cfg = cfg_for(tmp_path / "run")
    o = run_sweep(cfg, {}, mode="instant", n_actors=2)
    assert (o.planned, o.done, o.shards_committed, o.shards_total) == (120, 120, 9, 9) and o.complete
    store = RunStore.open(cfg.output)
    assert_one_row_per_neuron(store, 120)
    again = run_sweep(cfg, {}, mode="instant", n_actors=2)  # a finished run: nothing to do
    assert again.done == 120 and again.complete
    assert_one_row_per_neuron(store, 120)
    p = RunReader(store).progress()
    assert (p.done, p.pending, p.shards_committed, p.n_shards) == (120, 0, 9, 9)
    assert p.prompt_tokens == 120 * 14000


def test_budget_stops_scheduling_and_resume_continues(tmp_path):
    cfg = cfg_for(tmp_path / "run", max_inflight_shards=1, budget={"max_tokens": 100_000},
                  explainer={"price_input_per_mtok": 1.0})
    o = run_sweep(cfg, {}, mode="instant", n_actors=1)
    assert o.stopped_by_budget and "budget.max_tokens=100,000" in o.stopped_by_budget
    assert 0 < o.shards_committed < 9 and not o.complete
    assert o.cost_usd == pytest.approx(o.done * 2000 / 1e6)
    # a tally already over budget schedules nothing
    stuck = run_sweep(cfg, {}, mode="instant", n_actors=1)
    assert stuck.stopped_by_budget and stuck.shards_committed == o.shards_committed
    done = run_sweep(cfg.model_copy(update={"budget": cfg.budget.model_copy(update={"max_tokens": None})}), {},
                     mode="instant", n_actors=1)
    assert done.complete and done.done == 120
    assert_one_row_per_neuron(RunStore.open(cfg.output), 120)


def test_s3_output_against_a_local_s3_server(tmp_path):
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        s3 = {"endpoint_override": f"{host}:{port}", "scheme": "http", "access_key": "test", "secret_key": "test",
              "region": "us-east-1", "allow_bucket_creation": True}
        import pyarrow.fs as pafs
        pafs.S3FileSystem(**s3).create_dir("sweeps")
        cfg = cfg_for("s3://sweeps/run1")
        o = run_sweep(cfg, {}, mode="instant", n_actors=2, s3_options=s3)
        assert o.complete and o.done == 120
        store = RunStore.open("s3://sweeps/run1", s3_options=s3)
        assert_one_row_per_neuron(store, 120)
        assert len(store.list_files("_markers")) == 9
        assert not [p for p in store.list_files("") if "_tmp" in p]
        again = run_sweep(cfg, {}, mode="instant", n_actors=2, s3_options=s3)  # resume reads markers from S3
        assert again.complete
        assert_one_row_per_neuron(store, 120)
    finally:
        server.stop()


DONE = ("neuronsweep_neurons_total", frozenset({("status", "done")}))


def metric(samples, name):
    return samples[(name, frozenset())]


def test_metrics_move_during_a_sweep(tmp_path):
    port = free_port()
    metrics = SweepMetrics()
    server, _ = metrics.serve(port, addr="127.0.0.1")
    cfg = cfg_for(tmp_path / "run", max_inflight_shards=1, explainer={"price_input_per_mtok": 2.0})
    seen = []
    t = threading.Thread(target=lambda: seen.append(run_sweep(cfg, {}, mode="instant:0.02", n_actors=1,
                                                              metrics=metrics)))
    t.start()
    samples = []
    while t.is_alive():
        samples.append(scrape(f"http://127.0.0.1:{port}/metrics").get(DONE, 0))
        time.sleep(0.2)
    t.join()
    final = scrape(f"http://127.0.0.1:{port}/metrics")
    server.shutdown()
    assert final[DONE] == 120
    assert metric(final, "neuronsweep_neurons_planned") == 120
    assert metric(final, "neuronsweep_shards_committed_total") == 9
    assert metric(final, "neuronsweep_estimated_cost_dollars_total") == pytest.approx(120 * 2000 * 2.0 / 1e6)
    assert any(0 < v < 120 for v in samples), samples  # the series moved while the sweep ran
    assert samples == sorted(samples)


def test_actors_report_through_ray_metrics(tmp_path):
    """ShardActors export `ray_neuronsweep_actor_*` through Ray's per-node metrics endpoint."""
    port = ray._private.worker.global_worker.node.metrics_export_port
    run_sweep(cfg_for(tmp_path / "run"), {}, mode="instant", n_actors=1)
    deadline = time.monotonic() + 60
    total = 0.0
    while time.monotonic() < deadline:
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        total = sum(float(line.rpartition(" ")[2]) for line in text.splitlines()
                    if line.startswith("ray_neuronsweep_actor_neurons_total{") and 'status="done"' in line)
        if total >= 120:
            break
        time.sleep(1)
    assert total >= 120  # this test's sweep; earlier sweeps in the module count too
