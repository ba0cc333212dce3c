"""SIGKILL the driver of a real sweep (tiny GPT-2, real extraction, the method through the OpenAI-compatible
test server) at a seeded point and resume it through the CLI: the tables of an uninterrupted run, and no call the
journal holds paid for again."""
import os
import random
import signal
import subprocess
from collections import Counter

import pytest

from orchestrator.pipeline import committed_summaries
from orchestrator.plan import build_plan, model_shape
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from support.cli import CLI, run_cli
from support.e2e_sweep import ENV, assert_complete, config, journal_size, table_rows, wait_until, write_config
from support.gate import RequestGate
from testing.stubs import RuleResponder
from testing.testserver import TestServer

KILL_SEED = 20240611  # picks the kill point; any seed gives a kill with work outstanding (see below)
NEURONS = "0-5"  # of layers 0 and 1: 12 neurons in 3 shards


@pytest.mark.slow
def test_kill_9_of_the_driver_then_resume(tmp_path, record_property):
    """SIGKILL the driver at a seeded point, resume: the same tables as an uninterrupted run, no duplicate rows,
    and no call the journal holds is paid for again (counted at the test server).

    The kill point is a number of answered requests, fewer than the distinct requests the sweep needs: the test
    server answers that many and holds every later request unanswered, so when the driver is killed the sweep
    is stuck with work outstanding, and Ray's actors, which outlive the driver for a moment, cannot finish it."""
    with TestServer(responder=RuleResponder()) as ref_server:
        ref = SweepConfig.from_dict(config(tmp_path / "ref", ref_server, neurons=NEURONS))
        run_cli("sweep", "-c", write_config(tmp_path / "ref.yaml", ref), env=ENV, check=True)
        needed = len(ref_server.served)  # distinct answered requests of a whole sweep
    assert needed >= 8, needed
    gate = RequestGate(open_for=random.Random(KILL_SEED).randint(needed // 4, needed // 2), latency_s=0.03)

    run = tmp_path / "run"
    with TestServer(responder=RuleResponder(), latency=gate) as server:
        cfg = SweepConfig.from_dict(config(run, server, neurons=NEURONS))
        p = subprocess.Popen([*CLI, "sweep", "-c", write_config(tmp_path / "run.yaml", cfg)], env={**os.environ, **ENV},
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        wait_until(lambda: gate.held > 0 or p.poll() is not None, timeout=240, what="the sweep reaching the gate")
        assert p.poll() is None, f"the sweep exited ({p.returncode}) after {gate.passed} of {needed} requests"
        os.kill(p.pid, signal.SIGKILL)  # the driver only; its in-process Ray is left to notice
        p.wait()
        # every request let through has its answer (or its caller died first); none later is answered
        wait_until(lambda: sum(server.served.values()) == gate.passed, timeout=30, what="the passed requests")
        store = RunStore.open(str(run))
        committed_at_kill = len(committed_summaries(store))
        assert committed_at_kill < len(build_plan(cfg, model_shape(cfg, store)).shards)
        served_before = Counter(server.served)
        journaled = journal_size(run)  # an actor journaling after this only makes the bound below looser
        answered_at_kill = gate.passed

        gate.open()
        # the endpoint and key variable come from the user's config, never from run.json alone
        r = run_cli("resume", str(run), "--config", str(tmp_path / "run.yaml"), env=ENV)
        assert r.returncode == 0, r.stderr[-2000:]
        repeated = sum(1 for k, n in server.served.items() if n > served_before.get(k, 0) and served_before.get(k))
        in_flight_at_kill = sum(served_before.values()) - journaled
        record_property("measured", f"kill -9 then resume: killed after {answered_at_kill} of {needed} requests, "
                                    f"{committed_at_kill} shards committed, {journaled} journaled, "
                                    f"{in_flight_at_kill} in flight, {repeated} answered again")
        assert repeated <= max(0, in_flight_at_kill), (repeated, in_flight_at_kill)

    ref_store, store = RunStore.open(ref.output), RunStore.open(str(run))
    assert_complete(store, planned=12)
    for table, cols in [("ledger", ["layer", "neuron", "status"]),
                        ("explanations", ["layer", "neuron", "explanation", "candidate"]),
                        ("scores", ["layer", "neuron", "scorer", "score"])]:
        assert table_rows(store, table, cols) == table_rows(ref_store, table, cols), table
