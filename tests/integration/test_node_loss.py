"""A worker node dies mid-sweep: actors restart elsewhere, shards retry, nothing is lost or duplicated.

The cluster runs in a child process (`python tests/integration/test_node_loss.py RUN`): a multi-node `Cluster` torn down
inside the pytest process once left Ray's driver in a state where a later test's `ray.wait` segfaulted and took
the whole suite with it. The head node has no CPUs, so every shard actor lives on one of the two worker nodes,
and the scenario kills the worker holding the most of them (with one worker, Ray could pack all actors onto
the head and the kill would prove nothing)."""
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

FAST_HEALTH_CHECK = {"health_check_period_ms": 500, "health_check_failure_threshold": 3,
                     "health_check_timeout_ms": 500, "health_check_initial_delay_ms": 0}


def scenario(out: str) -> dict:
    import ray
    import ray.util.state
    from ray.cluster_utils import Cluster

    from orchestrator.pipeline import committed_summaries, run_sweep
    from orchestrator.store import RunStore
    from schemas.config import SweepConfig
    from testing.instant import InstantRunnerFactory, prepare_synthetic_run

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "object_store_memory": 100 * 1024**2, "_system_config": FAST_HEALTH_CHECK})
    workers = [cluster.add_node(num_cpus=1, object_store_memory=100 * 1024**2) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    cluster.wait_for_nodes()
    try:
        cfg = SweepConfig.from_dict({"output": out, "shard_size": 8, "metrics_port": 0, "max_inflight_shards": 2})
        prepare_synthetic_run(cfg, 2, 64)
        factory = InstantRunnerFactory(delay_s=0.1)
        result = []
        t = threading.Thread(target=lambda: result.append(run_sweep(cfg, {}, runner_factory=factory, n_actors=4)),
                             daemon=True)
        t.start()
        store = RunStore.open(cfg.output)
        deadline = time.monotonic() + 60
        while len(committed_summaries(store)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        alive = [a.node_id for a in ray.util.state.list_actors(filters=[("state", "=", "ALIVE")])]
        victim = max(workers, key=lambda w: alive.count(w.node_id))
        killed_with = alive.count(victim.node_id)
        committed_at_kill = len(committed_summaries(store))
        cluster.remove_node(victim, allow_graceful=False)
        t.join(timeout=120)
        o = result[0] if result else None
        return {"actors_on_killed_node": killed_with, "committed_at_kill": committed_at_kill,
                "finished": not t.is_alive(), "complete": bool(o and o.complete), "done": o.done if o else None,
                "shard_errors": o.shard_errors if o else None, "shards_total": o.shards_total if o else None}
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_sweep_survives_the_loss_of_a_worker_node(tmp_path):
    from orchestrator.store import RunStore

    out = tmp_path / "run"
    root = str(Path(__file__).resolve().parents[2])
    # the script's own folder heads its sys.path; the test doubles in `testing/` (not installed) need the root
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    # Ray's temp folder of its own (short: Ray's socket paths): a `Cluster` writes, and on shutdown deletes,
    # <RAY_TMPDIR>/ray/ray_current_cluster, the pointer a developer's `ray start` left in /tmp/ray
    with tempfile.TemporaryDirectory(prefix="ns-ray-", dir="/tmp") as ray_tmp:
        r = subprocess.run([sys.executable, __file__, str(out)], capture_output=True, text=True, timeout=400,
                           cwd=root, env={**env, "RAY_TMPDIR": ray_tmp})
    assert r.returncode == 0, r.stderr[-3000:]
    facts = json.loads(r.stdout.strip().splitlines()[-1])
    assert facts["actors_on_killed_node"] >= 1, "no actor was on the killed node; the test would prove nothing"
    assert facts["committed_at_kill"] < facts["shards_total"], "the sweep was over before the kill"
    assert facts["finished"] and facts["complete"] and facts["done"] == 128 and not facts["shard_errors"], facts
    store = RunStore.open(str(out))
    for table in ("ledger", "explanations", "scores"):
        t_ = store.read_table(table, columns=["layer", "neuron"])
        keys = list(zip(t_.column("layer").to_pylist(), t_.column("neuron").to_pylist()))
        assert len(keys) == len(set(keys)) == 128, table


if __name__ == "__main__":
    print(json.dumps(scenario(sys.argv[1])))
