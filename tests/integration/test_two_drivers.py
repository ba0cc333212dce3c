"""Two drivers on one run directory, as real processes: of two started together (with different seeds) one runs
and the other is refused before it plans anything; once the running one is killed, a resume takes its stale lease
over, removes the temporary files it left, and the run ends with exactly one row per neuron, of one config."""
from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from orchestrator.pipeline import run_sweep
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from schemas.layout import LEASE_FILE, MARKERS_DIR, RUN_FILE
from testing.instant import InstantRunnerFactory, prepare_synthetic_run

ROOT = Path(__file__).resolve().parents[2]

# A driver in its own process: the instant method, layer 0 at once, layer 1 held at the gate file (never opened
# here), so it stays in flight with the lease until it is killed. Prints `refused MESSAGE` if it cannot start.
DRIVER = r"""
import json, sys
from orchestrator.lease import LeaseHeldError
from orchestrator.pipeline import run_sweep
from schemas.config import SweepConfig
from testing.instant import InstantRunnerFactory
cfg = SweepConfig.from_dict(json.loads(sys.argv[1]))
print("ready", flush=True)
while not __import__("os").path.exists(sys.argv[2]):
    __import__("time").sleep(0.002)
try:
    run_sweep(cfg, {}, runner_factory=InstantRunnerFactory(gate_file=sys.argv[3], gate_from_layer=1), n_actors=1)
except LeaseHeldError as e:
    print("refused", e, flush=True)
    sys.exit(3)
"""


def config(out, seed: int, **kw) -> SweepConfig:
    return SweepConfig.from_dict({"output": str(out), "layers": "0-1", "neurons": "0-7", "shard_size": 4,
                                  "seed": seed, "metrics_port": 0, **kw})


def start_driver(cfg: SweepConfig, go: Path, gate: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.Popen([sys.executable, "-c", DRIVER, json.dumps(cfg.model_dump(mode="json")), str(go),
                             str(gate)], stdout=subprocess.PIPE, text=True, env=env, start_new_session=True, cwd=ROOT)


def wait_for(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


@pytest.mark.slow
def test_one_of_two_drivers_runs_and_a_resume_takes_over_after_it_dies(tmp_path, caplog, ray_local):
    run = tmp_path / "run"
    # the drivers join this test's local cluster, as drivers join a cluster (`--address`)
    address = ray_local.get_runtime_context().gcs_address
    configs = {seed: config(run, seed, ray_address=address) for seed in (1, 2)}
    prepare_synthetic_run(configs[1], n_layers=2, n_neurons=8)  # 2 layers x 2 shards of 4
    go, gate = tmp_path / "go", tmp_path / "gate-never-opened"
    drivers = {seed: start_driver(cfg, go, gate) for seed, cfg in configs.items()}
    try:
        assert [p.stdout.readline().strip() for p in drivers.values()] == ["ready", "ready"]
        go.touch()
        # the loser is refused at once, naming the winner; it wrote nothing (run.json is the winner's alone)
        wait_for(lambda: any(p.poll() is not None for p in drivers.values()), 120, "one driver to be refused")
        (loser,) = [seed for seed, p in drivers.items() if p.poll() is not None]
        (winner,) = [seed for seed in drivers if seed != loser]
        assert drivers[loser].returncode == 3
        refusal = drivers[loser].stdout.read()
        assert refusal.startswith(f"refused {run} is in use by another driver: ")
        assert f"pid {drivers[winner].pid} (run_sweep)" in refusal
        store = RunStore.open(str(run))
        wait_for(lambda: len(store.list_files(MARKERS_DIR)) == 2, 300, "layer 0's two shards to commit")
        assert store.read_json(RUN_FILE)["config"]["seed"] == winner
        assert drivers[winner].poll() is None  # held at the gate, with the lease
    finally:
        for p in drivers.values():
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)  # gone without a word; the cluster ends its job
            p.wait()
    leftover = run / "ledger" / "layer=1" / "_tmp-leftover"
    leftover.parent.mkdir(parents=True, exist_ok=True)
    leftover.write_bytes(b"half a file")

    with caplog.at_level(logging.WARNING, logger="orchestrator.lease"):
        o = run_sweep(configs[winner], {}, runner_factory=InstantRunnerFactory(), n_actors=1)
    assert "took over the stale lease of" in caplog.text and f"pid {drivers[winner].pid} no longer runs" in caplog.text
    assert o.complete and (o.planned, o.done, o.shards_committed) == (16, 16, 4)
    assert not leftover.exists() and not store.exists(LEASE_FILE)
    for table in ("ledger", "explanations", "scores"):
        t = store.read_table(table, columns=["layer", "neuron"])
        keys = list(zip(t.column("layer").to_pylist(), t.column("neuron").to_pylist()))
        assert len(keys) == len(set(keys)) == 16, table


def test_a_local_output_that_a_node_does_not_see_is_refused(tmp_path, ray_local):
    """Each node looks for the driver's lease at the output path; one that finds none there (a disk of its own,
    or a relative path resolved in another folder) would write elsewhere, so the sweep does not start."""
    from orchestrator.lease import RunLease
    from orchestrator.pipeline import check_output_shared
    from schemas.config import ConfigError

    store = RunStore.open(str(tmp_path / "run"), create=True)
    address = ray_local.get_runtime_context().gcs_address
    with RunLease(store).acquire() as lease:
        check_output_shared(config(tmp_path / "run", 0, ray_address=address), store, lease.token)  # seen: fine
        elsewhere = config(tmp_path / "what-a-node-sees", 0, ray_address=address)
        with pytest.raises(ConfigError, match=r"output: .*what-a-node-sees is a local path, and node .* of the Ray "
                                              r"cluster \(1 of 1 nodes\) does not see this run directory there"):
            check_output_shared(elsewhere, store, lease.token)
