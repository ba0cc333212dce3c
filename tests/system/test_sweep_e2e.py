"""The real pipeline end to end: tiny subject model, real extraction, the method through the OpenAI-compatible
test server (rule-following answers, real HTTP, journal, retries, shared limiter), commits and resume. The
driver killed with SIGKILL and resumed: test_kill_resume.py."""
from pathlib import Path

import pytest

from orchestrator.pipeline import run_sweep
from orchestrator.store import RunStore
from schemas.config import SweepConfig
from support.e2e_sweep import ENV, KEY, KEY_VAR, assert_complete, config, journal_size
from testing.stubs import RuleResponder
from testing.testserver import TestServer


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
