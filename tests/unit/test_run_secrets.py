"""Where keys go: run.json never decides it (an edited one cannot send a key to another server, nor name another
variable to send), URL credentials never reach run.json, and nothing secret travels as a Ray actor's argument."""
from __future__ import annotations

import json

import pytest

from orchestrator.cli.app import main
from orchestrator.pipeline import actor_config, config_in_actor
from orchestrator.plan import IMPORTED, config_for_run, prepare_run, read_run_file
from orchestrator.store import RunStore, with_env_credentials, without_secrets
from schemas.config import ConfigError, SweepConfig
from schemas.layout import EXTRACT_MARKER, RUN_FILE, records_file, sequences_part
from schemas.tables import to_table
from testing.testserver import TestServer

SECRET = "aws-secret-do-not-send-7c1e"


def extracted_run(path, **cfg) -> RunStore:
    """A run directory with records and tokens for layer 0's 4 neurons, and its run.json."""
    store = RunStore.open(str(path), create=True)
    store.write_table("sequences", to_table("sequences", [
        {"seq_id": s, "token_ids": [1, 2, 3], "tokens": [" a", " 1", " b"]} for s in range(30)]), sequences_part(0))
    store.write_table("records", to_table("records", [
        {"layer": 0, "neuron": n, "kind": kind, "rank": r, "seq_id": r + (20 if kind == "random" else 0),
         "activations": [0.0, 2.0, 0.0], "max_activation": 2.0}
        for n in range(4) for kind, k in (("top", 20), ("random", 15)) for r in range(k)]), records_file(0, 4), 0)
    store.write_json(EXTRACT_MARKER, {"model": {"name": IMPORTED, "architecture": "unknown", "n_layers": 1,
                                                "n_neurons": 4}, "layers": [0], "n_neurons": 4, "n_windows": 30})
    prepare_run(SweepConfig.from_dict({"output": str(path), "metrics_port": 0, **cfg}), store)
    return store


def edit_run_json(path, **backend) -> None:
    """What anyone who can write the run directory can do: point the explainer at their server and name the
    variable whose value goes along as the key."""
    doc = json.loads((path / RUN_FILE).read_text())
    doc["config"]["explainer"].update(backend)
    (path / RUN_FILE).write_text(json.dumps(doc))


def test_explain_sends_no_key_to_an_endpoint_an_edited_run_json_names(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    run = tmp_path / "run"
    extracted_run(run)
    with TestServer() as attacker:
        edit_run_json(run, kind="openai", model="gpt-x", base_url=attacker.base_url,
                      api_key_env="AWS_SECRET_ACCESS_KEY", capabilities="chat")
        code = main(["explain", "--layer", "0", "--neuron", "1", "--out", str(run)])
        assert attacker.log == []  # not one request reached it
    err = capsys.readouterr().err
    assert code == 2 and SECRET not in err
    assert err.strip() == (f"error: explainer.base_url: {RUN_FILE} names '{attacker.base_url}', but endpoints and "
                           f"API key variables are never taken from a run directory (whoever can edit it could send "
                           f"your key elsewhere); confirm it with --set explainer.base_url=... or --config with the "
                           f"run's config file")


def test_resume_refuses_an_unconfirmed_key_variable_and_takes_a_confirmed_one(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET)
    run = tmp_path / "run"
    extracted_run(run)
    edit_run_json(run, kind="openai", model="gpt-x", api_key_env="AWS_SECRET_ACCESS_KEY")
    assert main(["resume", str(run)]) == 2
    assert capsys.readouterr().err.strip().startswith(
        "error: explainer.api_key_env: run.json names 'AWS_SECRET_ACCESS_KEY', but endpoints and API key variables "
        "are never taken from a run directory")
    # the user's own choice is taken as given (runtime fields may change between runs)
    stored = read_run_file(RunStore.open(str(run)))["config"]
    user = SweepConfig.load(None, {"explainer.api_key_env": "MY_KEY", "explainer.base_url": "http://h:1/v1"})
    cfg = config_for_run(stored, user, output=str(run))
    assert (cfg.explainer.kind, cfg.explainer.model) == ("openai", "gpt-x")  # the method's settings: run.json's
    assert (cfg.explainer.api_key_env, cfg.explainer.base_url) == ("MY_KEY", "http://h:1/v1")


def test_a_run_json_with_default_endpoints_resumes_without_confirmation(tmp_path):
    run = tmp_path / "run"
    extracted_run(run, explainer={"kind": "openai", "model": "gpt-x"}, budget={"max_tokens": 10})
    stored = read_run_file(RunStore.open(str(run)))["config"]
    cfg = config_for_run(stored, SweepConfig.load(None, {"budget.max_tokens": 99}), output="elsewhere")
    assert (cfg.explainer.base_url, cfg.explainer.api_key_env) == (None, "OPENAI_API_KEY")
    assert cfg.budget.max_tokens == 99 and cfg.output == "elsewhere"
    with pytest.raises(ConfigError, match=r"changed: seed \(0 -> 3\)"):  # a result-changing field stays refused
        config_for_run(stored, SweepConfig.load(None, {"seed": 3}), output=str(run))


def test_url_credentials_never_reach_run_json_and_are_confirmed_by_the_full_url(tmp_path):
    url = "https://alice:pa55w0rd@llm.example.com/v1?api_key=k3y"
    run = tmp_path / "run"
    extracted_run(run, explainer={"kind": "openai", "model": "gpt-x", "base_url": url})
    for path in run.rglob("*"):
        if path.is_file():
            assert b"pa55w0rd" not in path.read_bytes() and b"k3y" not in path.read_bytes(), path
    stored = read_run_file(RunStore.open(str(run)))["config"]
    assert stored["explainer"]["base_url"] == "https://***@llm.example.com/v1?api_key=***"
    with pytest.raises(ConfigError, match="explainer.base_url: run.json names 'https://\\*\\*\\*@llm.example.com"):
        config_for_run(stored, SweepConfig(), output=str(run))
    cfg = config_for_run(stored, SweepConfig.load(None, {"explainer.base_url": url}), output=str(run))
    assert cfg.explainer.base_url == url


def test_actors_get_no_secret_and_take_them_from_their_environment():
    url = "https://alice:pa55w0rd@llm.example.com/v1"
    cfg = SweepConfig.from_dict({"explainer": {"kind": "openai", "model": "m", "base_url": url}})
    shipped = actor_config(cfg)
    assert "pa55w0rd" not in json.dumps(shipped)
    with pytest.raises(ConfigError, match="explainer.base_url carries credentials, which are never passed to Ray "
                                          "actors: set NEURONSWEEP_EXPLAINER_BASE_URL"):
        config_in_actor(shipped, {})
    with pytest.raises(ConfigError, match="names https://\\*\\*\\*@evil.example.com/v1, not the configured"):
        config_in_actor(shipped, {"NEURONSWEEP_EXPLAINER_BASE_URL": "https://alice:pa55w0rd@evil.example.com/v1"})
    assert config_in_actor(shipped, {"NEURONSWEEP_EXPLAINER_BASE_URL": url}).explainer.base_url == url
    s3 = {"endpoint_override": "h:9000", "scheme": "http", "access_key": "AK", "secret_key": "SK"}
    assert without_secrets(s3) == {"endpoint_override": "h:9000", "scheme": "http"}
    assert with_env_credentials(without_secrets(s3), {"AWS_ACCESS_KEY_ID": "AK2", "AWS_SECRET_ACCESS_KEY": "SK2"}) \
        == {"endpoint_override": "h:9000", "scheme": "http", "access_key": "AK2", "secret_key": "SK2"}
