"""The KubeRay manifests in k8s/: schema-valid (strict), internally consistent, and consistent with the config."""
from __future__ import annotations

import copy
import re

import pytest
import ray
import yaml

from schemas.config import SweepConfig
from support.k8s_validate import (
    REPO_ROOT,
    load_yaml_documents,
    non_string_ray_start_params,
    parse_quantity,
    ray_cluster_spec,
    ray_groups,
    validate_manifest,
)

K8S = REPO_ROOT / "k8s"
MANIFEST_FILES = sorted(K8S.glob("*.yaml"))


def _docs(name: str) -> list[dict]:
    return load_yaml_documents(K8S / name)


def _one(name: str, kind: str) -> dict:
    (doc,) = [d for d in _docs(name) if d["kind"] == kind]
    return doc


@pytest.fixture(scope="module")
def rayjob() -> dict:
    return _one("rayjob.yaml", "RayJob")


@pytest.fixture(scope="module")
def sweep_config() -> SweepConfig:
    return SweepConfig.from_dict(yaml.safe_load(_one("rayjob.yaml", "ConfigMap")["data"]["sweep.yaml"]))


def _containers(group_spec: dict) -> list[dict]:
    return group_spec["template"]["spec"]["containers"]


# --- schema validity ------------------------------------------------------------------------------------------
def test_manifest_files_exist():
    assert {p.name for p in MANIFEST_FILES} >= {"rayjob.yaml", "raycluster.yaml", "monitoring.yaml"}


@pytest.mark.parametrize("path", MANIFEST_FILES, ids=lambda p: p.name)
def test_every_manifest_validates_strictly(path):
    docs = load_yaml_documents(path)
    assert docs
    errors = [e for doc in docs for e in validate_manifest(doc)]
    assert errors == []


def test_strict_validation_rejects_typos_wrong_types_and_missing_fields(rayjob):
    bad = copy.deepcopy(rayjob)
    bad["spec"]["ttlSecondsAfterFinishd"] = 600                       # typo: pruned silently by the API server
    bad["spec"]["shutdownAfterJobFinishes"] = "yes"                  # not a boolean
    spec = bad["spec"]["rayClusterSpec"]
    spec["headGroupSpec"]["template"]["spec"]["containers"][0]["imagee"] = "x"   # typo deep in the PodSpec
    del spec["workerGroupSpecs"][0]["maxReplicas"]                   # required
    errors = "\n".join(validate_manifest(bad))
    assert "ttlSecondsAfterFinishd" in errors
    assert "'yes' is not of type 'boolean'" in errors
    assert "imagee" in errors
    assert "'maxReplicas' is a required property" in errors
    assert validate_manifest({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}}) == [
        "Pod/p: no schema for apiVersion=v1 kind=Pod"]


def test_plain_kinds_reject_unknown_fields():
    monitor = _docs("monitoring.yaml")[0]
    bad = copy.deepcopy(monitor)
    bad["spec"]["podMetricsEndpoints"][0]["prot"] = "metrics"
    assert any("prot" in e for e in validate_manifest(bad))
    assert validate_manifest(monitor) == []


@pytest.mark.parametrize("name,kind", [("rayjob.yaml", "RayJob"), ("raycluster.yaml", "RayCluster")])
def test_every_ray_start_param_is_a_string(name, kind):
    doc = _one(name, kind)
    assert non_string_ray_start_params(doc) == []
    bad = copy.deepcopy(doc)
    ray_cluster_spec(bad)["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    assert non_string_ray_start_params(bad) == ["head.num-cpus"]
    assert any("rayStartParams.num-cpus" in e and "not of type 'string'" in e for e in validate_manifest(bad))


# --- the RayJob's behaviour ----------------------------------------------------------------------------------
def test_rayjob_tears_down_and_retries_a_few_times(rayjob):
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert 0 < spec["ttlSecondsAfterFinished"] <= 3600
    assert 1 <= spec["backoffLimit"] <= 3


def test_entrypoint_reads_the_config_the_head_mounts(rayjob):
    assert rayjob["spec"]["entrypoint"].split() == ["neuronsweep", "sweep", "--config", "/config/sweep.yaml"]
    head = ray_cluster_spec(rayjob)["headGroupSpec"]["template"]["spec"]
    (mount,) = [m for m in head["containers"][0]["volumeMounts"] if m["mountPath"] == "/config"]
    (volume,) = [v for v in head["volumes"] if v["name"] == mount["name"]]
    assert volume["configMap"]["name"] == _one("rayjob.yaml", "ConfigMap")["metadata"]["name"]


def test_output_is_shared_storage_so_a_retry_resumes(sweep_config):
    assert re.match(r"^(s3|gs)://[^/]+/.+", sweep_config.output), (
        "a retried RayJob is a new cluster: the run directory must be on object storage, not in the pod")


def test_cluster_shape(rayjob):
    spec = ray_cluster_spec(rayjob)
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["rayVersion"] == ray.__version__
    groups = dict(ray_groups(rayjob))
    assert groups["head"]["rayStartParams"]["num-cpus"] == "0"
    for name, group in groups.items():
        gpus = [c["resources"]["limits"].get("nvidia.com/gpu") for c in _containers(group)]
        if name == "gpu-extract":
            assert group["minReplicas"] == group["replicas"] == 0 < group["maxReplicas"]
            assert gpus == ["1"]
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in (
                group["template"]["spec"]["tolerations"])
        else:
            assert gpus == [None]
        if name != "head":
            assert group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
    assert set(groups) == {"head", "gpu-extract", "cpu-api"}


def test_object_store_fits_in_the_memory_limit(rayjob):
    """KubeRay sizes /dev/shm (the object store) to the memory limit; the store must leave room for the heap."""
    for name, group in ray_groups(rayjob):
        (container,) = _containers(group)
        limits, requests = container["resources"]["limits"], container["resources"]["requests"]
        memory = parse_quantity(limits["memory"])
        assert parse_quantity(requests["memory"]) == memory, f"{name}: memory request != limit (OOM eviction)"
        store = int(group["rayStartParams"]["object-store-memory"])
        assert 0 < store <= 0.3 * memory, f"{name}: object store {store} B vs memory {memory} B"


def test_api_keys_come_from_secrets_in_every_pod(rayjob, sweep_config):
    key_vars = {b.api_key_env for b in (sweep_config.explainer, sweep_config.simulator)
                if b.kind == "openai" and b.api_key_env}
    assert key_vars == {"OPENAI_API_KEY"}
    for name, group in ray_groups(rayjob):
        for container in _containers(group):
            env = {e["name"]: e for e in container.get("env", [])}
            for var in key_vars:
                assert "value" not in env[var], f"{name}: {var} must not be written into the manifest"
                assert env[var]["valueFrom"]["secretKeyRef"]["name"] == "neuronsweep-api-key"
                assert env[var]["valueFrom"]["secretKeyRef"]["key"] == var


def test_driver_metrics_port_matches_the_config(rayjob, sweep_config):
    (head,) = _containers(dict(ray_groups(rayjob))["head"])
    ports = {p["name"]: p["containerPort"] for p in head["ports"]}
    assert ports["driver-metrics"] == sweep_config.metrics_port
    assert ports["metrics"] == int(dict(ray_groups(rayjob))["head"]["rayStartParams"]["metrics-export-port"])


def test_driver_metrics_bind_all_interfaces_in_the_pod(sweep_config):
    """Prometheus scrapes the pod's IP; the default bind, 127.0.0.1, would answer only inside the pod."""
    assert SweepConfig().metrics_host == "127.0.0.1"
    assert sweep_config.metrics_host == "0.0.0.0"


def test_raycluster_is_the_rayjob_cluster(rayjob):
    assert _one("raycluster.yaml", "RayCluster")["spec"] == ray_cluster_spec(rayjob)


def test_pod_monitors_select_pods_and_ports_that_exist(rayjob):
    pods = {"head" if name == "head" else "worker": [] for name, _ in ray_groups(rayjob)}
    for name, group in ray_groups(rayjob):
        pods["head" if name == "head" else "worker"].append(group["template"])
    monitors = [d for d in _docs("monitoring.yaml") if d["kind"] == "PodMonitor"]
    scraped = set()
    for monitor in monitors:
        labels = dict(monitor["spec"]["selector"]["matchLabels"])
        node_type = labels.pop("ray.io/node-type")                     # KubeRay puts this one on its pods
        for template in pods[node_type]:
            assert labels.items() <= template["metadata"]["labels"].items(), monitor["metadata"]["name"]
            names = {p["name"] for c in template["spec"]["containers"] for p in c.get("ports", [])}
            for endpoint in monitor["spec"]["podMetricsEndpoints"]:
                assert endpoint["port"] in names, (monitor["metadata"]["name"], endpoint["port"])
                scraped.add((node_type, endpoint["port"]))
    assert {("head", "driver-metrics"), ("head", "metrics"), ("worker", "metrics")} <= scraped


def test_dockerfile_pins_the_same_ray_as_the_manifests(rayjob):
    dockerfile = (K8S / "Dockerfile").read_text()
    (base,) = re.findall(r"^FROM (\S+)", dockerfile, flags=re.M)
    assert base == f"rayproject/ray:{ray_cluster_spec(rayjob)['rayVersion']}-py311-gpu"


def test_readme_section_names_files_and_secrets_that_exist(rayjob):
    readme = (REPO_ROOT / "README.md").read_text()
    doc = readme[readme.index("## Run on Kubernetes"):readme.index("## Layout")]
    for path in set(re.findall(r"\b((?:k8s|cluster)/[\w./-]+\.(?:yaml|yml|json|py)|k8s/Dockerfile)\b", doc)):
        assert (REPO_ROOT / path).exists(), path
    refs = {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for _, group in ray_groups(rayjob) for c in _containers(group) for e in c.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}
    for name, key in refs:
        assert re.search(rf"kubectl create secret generic {name}\b[^`]*--from-literal={key}=", doc), (name, key)
