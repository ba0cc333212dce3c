"""The real pipeline end to end: tiny subject model, real extraction, the method through the OpenAI-compatible
test server (rule-following answers, real HTTP, journal, retries, shared limiter), commits and resume."""
import os
import random
import signal
import sqlite3
import subprocess
import time
from collections import Counter
from pathlib import Path

import pytest
import yaml

from orchestrator.pipeline import committed_summaries, run_sweep
from orchestrator.plan import build_plan, model_shape
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from support.cli import CLI, run_cli
from support.gate import RequestGate
from testing.stubs import RuleResponder
from testing.testserver import TestServer

KEY_VAR, KEY = "NS_TEST_API_KEY", "sk-test-do-not-leak-4f9a1c"
ENV = {KEY_VAR: KEY}


def config(out, server, **kw) -> dict:
    backend = {"kind": "openai", "model": "rule-stub", "base_url": server.base_url, "api_key_env": KEY_VAR,
               "requests_per_minute": 60_000, "tokens_per_minute": 50_000_000, "concurrency": 16,
               "max_retries": 3, "timeout_s": 10}
    cfg = {"model": {"name": "tiny-gpt2", "batch_size": 16}, "corpus": {"seq_len": 16, "max_windows": 160},
           "layers": "0-1", "neurons": "0-11", "shard_size": 4, "output": str(out), "metrics_port": 0,
           "explainer": {**backend, "capabilities": "chat"},
           "simulator": {**backend, "capabilities": "chat_logprobs"},
           "scorers": ["correlation", "detection"]}
    for k, v in kw.items():
        cfg[k] = {**cfg[k], **v} if isinstance(v, dict) and isinstance(cfg.get(k), dict) else v
    return cfg


@pytest.fixture(scope="module", autouse=True)
def key_in_the_workers_environment():
    """The actors read API keys from their own environment, never from their arguments: the key must be in this
    process's environment before the module's local Ray starts (its workers inherit it), as a cluster's nodes
    hold it (a Kubernetes secretKeyRef)."""
    with pytest.MonkeyPatch.context() as m:
        m.setenv(KEY_VAR, KEY)
        yield


@pytest.fixture
def server():
    with TestServer(responder=RuleResponder()) as s:
        yield s


def table_rows(store, table, cols):
    t = store.read_table(table, columns=cols)
    return sorted(tuple(r[c] for c in cols) for r in t.to_pylist())


def assert_complete(store, planned=24):
    # a neuron's ledger has a row per attempt (a --retry-failed keeps the failed one: it was paid for)
    for table, extra in (("ledger", ["attempts"]), ("explanations", []), ("scores", ["scorer"])):
        rows = table_rows(store, table, ["layer", "neuron"] + extra)
        assert len(rows) == len(set(rows)), f"duplicate rows in {table}"
    latest = {}
    for layer, n, _attempts, status in table_rows(store, "ledger", ["layer", "neuron", "attempts", "status"]):
        latest[(layer, n)] = (layer, n, status)  # sorted by attempts: the last one stays
    ledger = sorted(latest.values())
    assert len(ledger) == planned
    done = {(layer, n) for layer, n, s in ledger if s == "done"}
    assert set(table_rows(store, "explanations", ["layer", "neuron"])) == done
    for scorer in ("correlation", "detection"):
        assert {(layer, n) for layer, n, s in table_rows(store, "scores", ["layer", "neuron", "scorer"])
                if s == scorer} == done


@pytest.mark.slow
def test_sweep_end_to_end_with_the_method(tmp_path, server, ray_local):
    cfg = SweepConfig.from_dict(config(tmp_path / "run", server))
    o = run_sweep(cfg, ENV)
    store = RunStore.open(cfg.output)
    assert o.complete and o.planned == 24 and o.done + o.skipped == 24 and o.failed == 0
    assert o.done >= 12  # tiny random GPT-2 neurons: most fire above 0 somewhere
    assert_complete(store)
    scores = [r for r in store.read_table("scores").to_pylist() if r["scorer"] == "correlation"]
    assert all(r["simulator_mode"] == "generated_logprob" for r in scores)
    assert o.prompt_tokens > 0
    # every distinct paid request is in the journal (two actors may race on one identical request, e.g. the
    # same explanation simulated on the same random window for two neurons; the journal then holds it once)
    assert journal_size(Path(cfg.output)) == len(server.served)
    # each committed shard carries the journal rows of the calls it used (a shared answer in each shard using it)
    assert len(set(store.read_table("calls").column("key").to_pylist())) == len(server.served)
    # the viewer and the report read a real sweep's output
    from fastapi.testclient import TestClient

    from orchestrator.results.viewer.app import create_app
    client = TestClient(create_app(cfg.output))
    assert client.get("/").status_code == 200
    done = next(r for r in store.read_table("ledger").to_pylist() if r["status"] == "done")
    page = client.get(f"/neuron/{done['layer']}/{done['neuron']}")
    assert page.status_code == 200 and "data-act=" in page.text and "data-sim=" in page.text
    assert client.get("/api/run").json()
    # the key never reaches any file of the run
    for path in Path(cfg.output).rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path


@pytest.mark.slow
def test_provider_faults_are_recorded_and_retry_failed_finishes(tmp_path, server, ray_local):
    server.fault_rates = {"500": 0.08, "malformed": 0.04, "drop": 0.02}
    cfg = SweepConfig.from_dict(config(tmp_path / "run", server, explainer={"max_retries": 1},
                                       simulator={"max_retries": 1}))
    o = run_sweep(cfg, ENV)
    store = RunStore.open(cfg.output)
    assert o.complete and o.failed > 0 and o.done > 0  # the sweep went on past failing neurons
    ledger = store.read_table("ledger").to_pylist()
    failed = [r for r in ledger if r["status"] == "failed"]
    assert all(r["error"] for r in failed) and len(failed) == o.failed
    print(sorted({r["error"] for r in failed}))
    assert set(o.failures) <= {"malformed", "server_error", "connection"}
    assert_complete(store)
    server.fault_rates = {}
    again = run_sweep(cfg, ENV, retry_failed=True)
    assert again.failed == 0 and again.done + again.skipped == 24
    assert_complete(store)
    retried = {(r["layer"], r["neuron"]) for r in failed}
    attempts = sorted((r["layer"], r["neuron"], r["attempts"]) for r in store.read_table("ledger").to_pylist()
                      if (r["layer"], r["neuron"]) in retried)
    assert attempts == sorted((*key, a) for key in retried for a in (1, 2))  # the failed attempt's row stays


def test_a_missing_api_key_fails_before_any_work(tmp_path, server):
    cfg = SweepConfig.from_dict(config(tmp_path / "run", server))
    from schemas.config import ConfigError
    with pytest.raises(ConfigError, match=f"explainer.api_key_env: environment variable {KEY_VAR} is not set"):
        run_sweep(cfg, {})
    assert not (tmp_path / "run").exists()


def journal_size(run: Path) -> int:
    db = run / "_journal" / "calls.sqlite"
    if not db.exists():
        return 0
    with sqlite3.connect(db) as c:
        return c.execute("SELECT COUNT(*) FROM calls").fetchone()[0]


KILL_SEED = 20240611  # picks the kill point; any seed gives a kill with work outstanding (see below)


@pytest.mark.slow
def test_kill_9_of_the_driver_then_resume(tmp_path):
    """SIGKILL the driver at a seeded point, resume: the same tables as an uninterrupted run, no duplicate rows,
    and no call the journal holds is paid for again (counted at the test server).

    The kill point is a number of answered requests, fewer than the distinct requests the sweep needs: the test
    server answers that many and holds every later request unanswered, so when the driver is killed the sweep
    is stuck with work outstanding, and Ray's actors, which outlive the driver for a moment, cannot finish it."""
    with TestServer(responder=RuleResponder()) as ref_server:
        ref = SweepConfig.from_dict(config(tmp_path / "ref", ref_server))
        run_cli("sweep", "-c", _write(tmp_path / "ref.yaml", ref), env=ENV, check=True)
        needed = len(ref_server.served)  # distinct answered requests of a whole sweep
    assert needed >= 8, needed
    gate = RequestGate(open_for=random.Random(KILL_SEED).randint(needed // 4, needed // 2), latency_s=0.03)

    run = tmp_path / "run"
    with TestServer(responder=RuleResponder(), latency=gate) as server:
        cfg = SweepConfig.from_dict(config(run, server))
        p = subprocess.Popen([*CLI, "sweep", "-c", _write(tmp_path / "run.yaml", cfg)], env={**os.environ, **ENV},
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
        print(f"killed after {answered_at_kill} of {needed} requests, {committed_at_kill} shards committed: "
              f"journaled={journaled} in_flight_at_kill={in_flight_at_kill} repeated={repeated}")
        assert repeated <= max(0, in_flight_at_kill), (repeated, in_flight_at_kill)

    ref_store, store = RunStore.open(ref.output), RunStore.open(str(run))
    assert_complete(store)
    for table, cols in [("ledger", ["layer", "neuron", "status"]),
                        ("explanations", ["layer", "neuron", "explanation", "candidate"]),
                        ("scores", ["layer", "neuron", "scorer", "score"])]:
        assert table_rows(store, table, cols) == table_rows(ref_store, table, cols), table


def wait_until(check, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _write(path: Path, cfg: SweepConfig) -> str:
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def test_explain_one_neuron_from_the_cli(tmp_path, server, ray_local, monkeypatch, capsys):
    """`neuronsweep explain` after the extraction: one neuron in-process, printed, nothing committed."""
    from orchestrator.cli.app import main
    from orchestrator.extraction import run_extraction

    cfg = SweepConfig.from_dict(config(tmp_path / "run", server, layers="1"))
    run_extraction(cfg, RunStore.open(cfg.output, create=True))
    monkeypatch.setenv(KEY_VAR, KEY)
    args = ["explain", "--layer", "1", "--neuron", "5", "--out", cfg.output, "--model", "tiny-gpt2",
            *[f"--set={k}={v}" for k, v in [("explainer.kind", "openai"), ("explainer.base_url", server.base_url),
                                              ("explainer.api_key_env", KEY_VAR), ("explainer.model", "rule-stub"),
                                              ("explainer.capabilities", "chat"), ("simulator.kind", "openai"),
                                              ("simulator.base_url", server.base_url), ("simulator.model", "rule-stub"),
                                              ("simulator.api_key_env", KEY_VAR),
                                              ("simulator.capabilities", "chat_logprobs")]]]
    assert main(args) == 0
    text = capsys.readouterr().out
    assert "layer 1 neuron 5" in text and "correlation" in text and "[generated_logprob]" in text
    assert not (tmp_path / "run" / "_markers").exists()
    assert main(["explain", "--layer", "0", "--neuron", "5", "--out", cfg.output, "--model", "tiny-gpt2"]) == 2
