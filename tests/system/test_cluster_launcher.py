"""The Ray cluster-launcher configs in cluster/: valid for Ray's own validator, and following the project's
conventions (CPU-less head, GPU types scaling from zero, metrics ports, pinned Ray)."""
from __future__ import annotations

import base64
import copy
import importlib.util
import re

import jsonschema
import pytest
import ray
import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from schemas.config import SweepConfig
from support.k8s_validate import REPO_ROOT

LAUNCHER_FILES = sorted((REPO_ROOT / "cluster").glob("ray-*.yaml"))


def _load(path) -> dict:
    return yaml.safe_load(path.read_text())


def ray_validate(config: dict) -> dict:
    """Ray's own check of a cluster config, as `ray up` runs it: fill in the defaults, then the JSON schema."""
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_there_is_a_launcher_config_per_cloud():
    assert {p.name for p in LAUNCHER_FILES} == {"ray-aws-gpu.yaml", "ray-gcp-gpu.yaml"}


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_passes_rays_validation(path):
    prepared = ray_validate(_load(path))
    # prepare_config merges the provider's defaults: every command list must be ours, not Ray's nightly wheel
    assert not any("ray-wheels" in cmd for key in ("setup_commands", "head_setup_commands", "worker_setup_commands")
                   for cmd in prepared[key])


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_rays_validation_rejects_typos(path):
    config = _load(path)
    config["max_wokers"] = 3
    with pytest.raises(jsonschema.ValidationError, match="max_wokers"):
        ray_validate(config)
    config = _load(path)
    next(iter(config["available_node_types"].values()))["min_wrokers"] = 0
    with pytest.raises(jsonschema.ValidationError, match="min_wrokers"):
        ray_validate(config)


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_node_types(path):
    config = _load(path)
    types = config["available_node_types"]
    assert types[config["head_node_type"]]["resources"] == {"CPU": 0}
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) >= 1}
    assert gpu_types, "no GPU worker type"
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0 < t["max_workers"], name
        if config["provider"]["type"] == "gcp":
            assert t["node_config"]["scheduling"]["onHostMaintenance"] == "TERMINATE", name
    api = types["cpu-api"]
    assert api["min_workers"] >= 1 and "GPU" not in api["resources"]
    assert config["max_workers"] >= sum(t.get("max_workers", 0) for n, t in types.items()
                                        if n != config["head_node_type"])


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_same_ray_everywhere_and_metrics_exported(path):
    config = _load(path)
    assert config["docker"]["image"] == f"rayproject/ray:{ray.__version__}-py311-gpu"
    dockerfile = (REPO_ROOT / "k8s" / "Dockerfile").read_text()
    assert re.search(rf"^FROM {re.escape(config['docker']['image'])}$", dockerfile, flags=re.M)
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        assert "--metrics-export-port=8080" in start, key
    assert config["file_mounts"] == {"~/neuronsweep": "."}
    assert any(c.startswith("pip install -q ~/neuronsweep") for c in config["setup_commands"])


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_every_node_reads_the_api_key_from_the_clouds_secret_manager(path):
    config = _load(path)
    provider = config["provider"]
    for key in ("head_start_ray_commands", "worker_start_ray_commands"):
        (start,) = [c for c in config[key] if "ray start" in c]
        m = re.match(r'export OPENAI_API_KEY="\$\(python ~/neuronsweep/cluster/fetch_secret.py (.+?)\)";', start)
        assert m, key
        args = m.group(1).split()
        assert args[0] == provider["type"]
        if provider["type"] == "aws":
            assert args[2] == provider["region"]                 # boto3 cannot find it on the node by itself
    assert "OPENAI_API_KEY" not in yaml.safe_dump(config["setup_commands"])


# --- cluster/fetch_secret.py ----------------------------------------------------------------------------------
def _fetch_secret_module():
    spec = importlib.util.spec_from_file_location("fetch_secret", REPO_ROOT / "cluster" / "fetch_secret.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_fetch_secret_from_aws_secrets_manager(monkeypatch, capsys):
    import boto3
    from moto import mock_aws

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, "testing")
    fetch = _fetch_secret_module()
    with mock_aws():
        boto3.client("secretsmanager", region_name="eu-west-1").create_secret(
            Name="neuronsweep/openai-api-key", SecretString="sk-test-123")
        assert fetch.main(["aws", "neuronsweep/openai-api-key", "eu-west-1"]) == 0
        assert capsys.readouterr().out == "sk-test-123"
        assert fetch.main(["aws", "neuronsweep/missing", "eu-west-1"]) == 1
        err = capsys.readouterr()
        assert err.out == "" and "neuronsweep/missing" in err.err


def test_fetch_secret_from_gcp_secret_manager():
    fetch = _fetch_secret_module()
    calls = []

    def fake_get_json(url, headers):
        calls.append((url, headers))
        if url.endswith("/project/?recursive=true"):
            return {"projectId": "proj-1"}
        if url.endswith("/token"):
            return {"access_token": "tok"}
        return {"payload": {"data": base64.b64encode(b"sk-gcp-9").decode()}}

    assert fetch.gcp_secret("neuronsweep-openai-api-key", get_json=fake_get_json) == "sk-gcp-9"
    assert calls[2] == ("https://secretmanager.googleapis.com/v1/projects/proj-1/secrets/"
                        "neuronsweep-openai-api-key/versions/latest:access", {"Authorization": "Bearer tok"})
    assert all(h == {"Metadata-Flavor": "Google"} for _, h in calls[:2])


def test_fetch_secret_usage(capsys):
    fetch = _fetch_secret_module()
    assert fetch.main(["aws", "name"]) == 2 and fetch.main(["azure", "name"]) == 2
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("path", LAUNCHER_FILES, ids=lambda p: p.name)
def test_head_runs_prometheus_with_the_shipped_config(path):
    config = _load(path)
    (start,) = [c for c in config["head_start_ray_commands"] if "prometheus " in c]
    assert "--config.file=$HOME/neuronsweep/cluster/prometheus.yml" in start
    prometheus = yaml.safe_load((REPO_ROOT / "cluster" / "prometheus.yml").read_text())
    (driver_job,) = [j for j in prometheus["scrape_configs"] if j["job_name"] == "neuronsweep-driver"]
    assert driver_job["static_configs"][0]["targets"] == [f"127.0.0.1:{SweepConfig().metrics_port}"]
