"""The planner: resolve the config against the model, cut the neuron space into shards with deterministic
ids, and pin the run directory to its config (`run.json`).

A run directory is the unit of resume. Re-running it with a config that would change any result is refused,
naming the fields; knobs that only change how fast or where it runs (concurrency, limits, prices, the Ray
address, the metrics port, the budget) may change between runs.
"""
from __future__ import annotations

import datetime as dt
import platform
from dataclasses import dataclass

from orchestrator.store import RunStore
from schemas.config import ConfigError, SweepConfig

EXTRACT_MARKER = "_extract/complete.json"
IMPORTED = "imported"  # the model name and shard id of rows imported from another tool (or synthetic)
RUN_FILE = "run.json"

# Fields that may differ between runs of the same directory (they change speed, place or spend, not results).
RUNTIME_FIELDS = {
    "ray_address", "metrics_port", "max_inflight_shards", "neuron_deadline_s", "budget", "output",
    "model.batch_size", "model.device",
    *(f"{role}.{f}" for role in ("explainer", "simulator") for f in (
        "base_url", "api_key_env", "requests_per_minute", "tokens_per_minute", "concurrency", "timeout_s",
        "max_retries", "price_input_per_mtok", "price_output_per_mtok")),
}


@dataclass(frozen=True)
class Shard:
    layer: int
    neurons: tuple[int, ...]

    @property
    def shard_id(self) -> str:
        return f"L{self.layer:03d}-{self.neurons[0]:06d}-{self.neurons[-1]:06d}"


@dataclass
class Plan:
    model: dict  # name, architecture, n_layers, n_neurons
    shards: list[Shard]

    @property
    def n_neurons(self) -> int:
        return sum(len(s.neurons) for s in self.shards)


def make_shards(layers: list[int], neurons: list[int], shard_size: int) -> list[Shard]:
    """Each layer's selected neurons, in order, cut into shards of at most `shard_size`."""
    return [Shard(layer, tuple(neurons[i:i + shard_size]))
            for layer in layers for i in range(0, len(neurons), shard_size)]


def model_shape(cfg: SweepConfig, store: RunStore) -> dict:
    """The subject model's shape: from an imported run's extraction marker, else from the model config."""
    if store.exists(EXTRACT_MARKER):
        marker = store.read_json(EXTRACT_MARKER)
        m = marker.get("model")
        if isinstance(m, dict) and m.get("name") == IMPORTED:
            return {"name": IMPORTED, "architecture": m.get("architecture", "unknown"),
                    "n_layers": int(m["n_layers"]), "n_neurons": int(m["n_neurons"]), "max_positions": None}
    from workers.models.loading import model_info

    info = model_info(cfg.model.name)
    return {"name": info.name, "architecture": info.architecture, "n_layers": info.n_layers,
            "n_neurons": info.n_neurons, "max_positions": info.max_positions}


def build_plan(cfg: SweepConfig, shape: dict) -> Plan:
    cfg.check_against_model(shape["n_layers"], shape["n_neurons"], shape.get("max_positions"))
    layers = cfg.layer_list(shape["n_layers"])
    neurons = cfg.neuron_list(shape["n_neurons"])
    return Plan(model=shape, shards=make_shards(layers, neurons, cfg.shard_size))


def config_diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted names of the result-changing fields that differ between two config dicts."""
    out = []
    for key in sorted(set(old) | set(new)):
        name = f"{prefix}{key}"
        if name in RUNTIME_FIELDS:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{name}.")
        elif a != b:
            out.append(name)
    return out


def check_extracted_layers(plan: Plan, store: RunStore) -> None:
    """A run directory extracted earlier (by `neuronsweep extract` or an import) must hold every planned layer."""
    if not store.exists(EXTRACT_MARKER):
        return
    extracted = store.read_json(EXTRACT_MARKER).get("layers")
    if extracted is None:
        return
    missing = sorted({s.layer for s in plan.shards} - set(extracted))
    if missing:
        raise ConfigError(f"layers: {','.join(map(str, missing))} not extracted in {store.root} (extracted: "
                          f"{','.join(map(str, extracted))}); choose among those or use a new --out directory")


def prepare_run(cfg: SweepConfig, store: RunStore) -> Plan:
    """Plan the sweep and write run.json; for an existing run, refuse a config that would change results."""
    shape = model_shape(cfg, store)
    plan = build_plan(cfg, shape)
    check_extracted_layers(plan, store)
    new = cfg.model_dump(mode="json")
    if store.exists(RUN_FILE):
        old = store.read_json(RUN_FILE)["config"]
        changed = config_diff(old, new)
        if changed:
            detail = ", ".join(f"{f} ({_get(old, f)!r} -> {_get(new, f)!r})" for f in changed[:6])
            raise ConfigError(
                f"run directory {cfg.output} was started with a different config; changed: {detail}. "
                f"Use the same config (`neuronsweep resume {cfg.output}`) or a new --out directory")
    else:
        store.write_json(RUN_FILE, {
            "config": new,
            "model": shape,
            "plan": {"n_neurons": plan.n_neurons, "n_shards": len(plan.shards), "shard_size": cfg.shard_size},
            "versions": versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        })
    return plan


def load_run_config(store: RunStore) -> SweepConfig:
    if not store.exists(RUN_FILE):
        raise ConfigError(f"{store.root} is not a neuronsweep run directory (no {RUN_FILE})")
    return SweepConfig.from_dict(store.read_json(RUN_FILE)["config"])


def versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("neuronsweep", "ray", "torch", "transformers", "pyarrow", "openai"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            pass
    return out


def _get(d: dict, dotted: str):
    for k in dotted.split("."):
        d = d.get(k) if isinstance(d, dict) else None
    return d
