"""A worker node dies mid-sweep: actors restart elsewhere, shards retry, nothing is lost or duplicated."""
import threading
import time

import pytest
import ray
import ray.util.state
from ray.cluster_utils import Cluster

from orchestrator.pipeline import committed_summaries, run_sweep
from orchestrator.store import RunStore
from schemas.config import SweepConfig

FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                     "health_check_timeout_ms": 500, "health_check_initial_delay_ms": 0}


@pytest.mark.slow
def test_sweep_survives_the_loss_of_a_worker_node(tmp_path):
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "object_store_memory": 150 * 1024**2, "_system_config": FAST_HEALTH_CHECK})
    worker = cluster.add_node(num_cpus=1, object_store_memory=150 * 1024**2)
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        cfg = SweepConfig.from_dict({"model": {"name": "synthetic:2x64"}, "output": str(tmp_path / "run"),
                                     "shard_size": 8, "metrics_port": 0, "max_inflight_shards": 2})
        result = []
        t = threading.Thread(target=lambda: result.append(run_sweep(cfg, {}, mode="instant:0.05", n_actors=4)), daemon=True)
        t.start()
        store = RunStore.open(cfg.output)
        deadline = time.monotonic() + 60
        while len(committed_summaries(store)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        on_worker = [a for a in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")])
                     if a.node_id == worker.node_id]
        assert on_worker, "no actor was placed on the worker node; the test would prove nothing"
        cluster.remove_node(worker, allow_graceful=False)
        t.join(timeout=120)
        assert not t.is_alive()
        o = result[0]
        assert o.complete and o.done == 128 and not o.shard_errors
        for table in ("ledger", "explanations", "scores"):
            t_ = store.read_table(table, columns=["layer", "neuron"])
            keys = list(zip(t_.column("layer").to_pylist(), t_.column("neuron").to_pylist()))
            assert len(keys) == len(set(keys)) == 128, table
    finally:
        ray.shutdown()
        cluster.shutdown()
