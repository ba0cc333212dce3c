"""Offline validation of Kubernetes manifests: KubeRay kinds against their CRD schemas, plain kinds structurally.

It does what `kubeconform -strict` does, with pyyaml + jsonschema (already Ray dependencies): take each CRD's
`openAPIV3Schema` and, in strict mode, forbid unknown fields wherever the schema declares `properties` without
`x-kubernetes-preserve-unknown-fields` -- the API server prunes such fields silently, so a typo like
`ttlSecondsAfterFinishd` would otherwise be accepted and ignored. CEL rules (`x-kubernetes-validations`) are not
checked; only `kubectl apply --dry-run=server` against a cluster does that.
"""
from __future__ import annotations

import copy
import functools
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
# CI lays shared/ beside the clone; the environment variable points elsewhere when needed.
CRD_DIR = Path(os.environ.get("NEURONSWEEP_KUBERAY_CRDS", REPO_ROOT.parent / "shared" / "kuberay-crds"))

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml: 0.2 s instead of ~2 s per CRD file


def load_yaml_documents(path: Path) -> list[dict[str, Any]]:
    with open(path) as f:
        return [doc for doc in yaml.load_all(f, Loader=_Loader) if doc is not None]


def strictify(schema: Any) -> Any:
    """A copy of an OpenAPI v3 schema that rejects fields it does not declare."""
    schema = copy.deepcopy(schema)

    def visit(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                visit(value)
        elif isinstance(node, list):
            for item in node:
                visit(item)

    visit(schema)
    return schema


@functools.cache
def crd_schemas(crd_dir: Path = CRD_DIR, strict: bool = True) -> dict[tuple[str, str], dict]:
    """{(apiVersion, kind): schema} for every served version of every CRD file in `crd_dir`."""
    files = sorted(Path(crd_dir).glob("*.yaml"))
    if not files:
        raise FileNotFoundError(f"no CRD YAML files in {crd_dir} (set NEURONSWEEP_KUBERAY_CRDS)")
    schemas = {}
    for path in files:
        for crd in load_yaml_documents(path):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = strictify(schema) if strict else schema
    return schemas


# --- plain kinds: the fields we use, unknown ones rejected ---------------------------------------------------
_NAME = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_METADATA = {
    "type": "object", "required": ["name"], "additionalProperties": False,
    "properties": {"name": _NAME, "namespace": _NAME, "labels": _STR_MAP, "annotations": _STR_MAP},
}
_SELECTOR = {
    "type": "object", "additionalProperties": False,
    "properties": {"matchLabels": _STR_MAP, "matchExpressions": {"type": "array"}},
}
_RELABEL = {
    "type": "object", "additionalProperties": False,
    "properties": {k: {"type": "string"} for k in ("action", "regex", "replacement", "separator", "targetLabel")}
    | {"sourceLabels": {"type": "array", "items": {"type": "string"}}},
}
_ENDPOINT = {  # monitoring.coreos.com/v1 PodMetricsEndpoint / Endpoint, the fields used here
    "type": "object", "required": ["port"], "additionalProperties": False,
    "properties": {"port": {"type": "string"}, "path": {"type": "string"}, "interval": {"type": "string"},
                   "scrapeTimeout": {"type": "string"}, "honorLabels": {"type": "boolean"},
                   "relabelings": {"type": "array", "items": _RELABEL}},
}


def _kind(spec: dict | None = None, **top: Any) -> dict:
    props = {"apiVersion": {"type": "string"}, "kind": {"type": "string"}, "metadata": _METADATA, **top}
    if spec is not None:
        props["spec"] = spec
    return {"type": "object", "required": ["apiVersion", "kind", "metadata"], "additionalProperties": False,
            "properties": props}


def _monitor(endpoints_key: str) -> dict:
    return _kind({
        "type": "object", "required": ["selector", endpoints_key], "additionalProperties": False,
        "properties": {
            "selector": _SELECTOR,
            "namespaceSelector": {"type": "object", "additionalProperties": False,
                                  "properties": {"any": {"type": "boolean"},
                                                 "matchNames": {"type": "array", "items": {"type": "string"}}}},
            "jobLabel": {"type": "string"},
            "podTargetLabels": {"type": "array", "items": {"type": "string"}},
            endpoints_key: {"type": "array", "minItems": 1, "items": _ENDPOINT},
        }})


PLAIN_SCHEMAS: dict[tuple[str, str], dict] = {
    ("v1", "ConfigMap"): _kind(data=_STR_MAP),
    ("v1", "Secret"): _kind(type={"type": "string"}, stringData=_STR_MAP, data=_STR_MAP),
    ("v1", "PersistentVolumeClaim"): _kind({
        "type": "object", "required": ["accessModes", "resources"], "additionalProperties": False,
        "properties": {"accessModes": {"type": "array", "items": {"enum": ["ReadWriteOnce", "ReadOnlyMany",
                                                                          "ReadWriteMany", "ReadWriteOncePod"]}},
                       "storageClassName": {"type": "string"},
                       "resources": {"type": "object", "additionalProperties": False,
                                     "properties": {"requests": _STR_MAP}}}}),
    ("monitoring.coreos.com/v1", "PodMonitor"): _monitor("podMetricsEndpoints"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"): _monitor("endpoints"),
}


def validate_manifest(doc: dict[str, Any], crd_dir: Path = CRD_DIR) -> list[str]:
    """Every problem with one manifest, as 'Kind/name: path: message' lines; [] when it is valid."""
    key = (doc.get("apiVersion"), doc.get("kind"))
    name = f"{doc.get('kind')}/{(doc.get('metadata') or {}).get('name')}"
    schema = crd_schemas(Path(crd_dir)).get(key) or PLAIN_SCHEMAS.get(key)
    if schema is None:
        return [f"{name}: no schema for apiVersion={key[0]} kind={key[1]}"]
    validator = jsonschema.Draft7Validator(schema)
    errors = [f"{name}: {'.'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
              for e in validator.iter_errors(doc)]
    meta = doc.get("metadata")
    if not isinstance(meta, dict) or not meta.get("name"):  # CRD schemas leave metadata as a bare object
        errors.append(f"{name}: metadata.name is required")
    return errors


# --- walking a RayCluster spec (inside a RayJob or on its own) ------------------------------------------------
def ray_cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_groups(doc: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """('head', headGroupSpec) then (groupName, workerGroupSpec) for each worker group."""
    spec = ray_cluster_spec(doc)
    yield "head", spec["headGroupSpec"]
    for group in spec.get("workerGroupSpecs", []):
        yield group["groupName"], group


def non_string_ray_start_params(doc: dict[str, Any]) -> list[str]:
    """'group.key' for each rayStartParams value that is not a string (KubeRay rejects them)."""
    return [f"{group}.{key}" for group, spec in ray_groups(doc)
            for key, value in (spec.get("rayStartParams") or {}).items() if not isinstance(value, str)]


def parse_quantity(text: str | int) -> float:
    """A Kubernetes resource quantity as a number: '8Gi' -> 8 * 2**30, '500m' -> 0.5, '1G' -> 1e9."""
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(Ki|Mi|Gi|Ti|k|M|G|T|m)?", str(text))
    if not m:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    factor = {None: 1, "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
              "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}[m.group(2)]
    return float(m.group(1)) * factor
