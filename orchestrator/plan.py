"""The planner: resolve the config against the model, cut the neuron space into shards with deterministic
ids, and pin the run directory to its config (`run.json`).

A run directory is the unit of resume. Re-running it with a config that would change any result is refused,
naming the fields; knobs that only change how fast or where it runs (concurrency, limits, prices, the Ray
address, the metrics port, the budget) may change between runs.

`run.json` is read as untrusted input: a damaged or hand-edited one, or a run directory whose committed shards or
extraction outputs do not match it, is a one-line error naming the file and what to do (`read_run_file`,
`check_run_directory`). It never decides where a key is sent: it stores endpoints without their credentials, and a
run continued from it takes endpoints and key variables from the user (`config_for_run`).
"""
from __future__ import annotations

import copy
import datetime as dt
import platform
import re
from dataclasses import dataclass

from orchestrator.store import RunDirectoryError, RunStore, damaged
from schemas.config import ConfigError, SweepConfig
from schemas.layout import (
    EXTRACT_MARKER,
    IMPORTED,
    MARKERS_DIR,
    RUN_FILE,
    is_hidden,
    marker_shard_id,
    partition_dir,
    shard_marker,
)

# Fields that may differ between runs of the same directory (they change speed, place or spend, not results).
RUNTIME_FIELDS = {
    "ray_address", "metrics_port", "metrics_host", "max_inflight_shards", "max_shard_crashes", "neuron_deadline_s",
    "budget", "output",
    "model.batch_size", "model.device",
    *(f"{role}.{f}" for role in ("explainer", "simulator") for f in (
        "base_url", "api_key_env", "requests_per_minute", "tokens_per_minute", "concurrency", "timeout_s",
        "max_retries", "retry_after_cap_s", "price_input_per_mtok", "price_output_per_mtok")),
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
    shape = {"name": info.name, "architecture": info.architecture, "n_layers": info.n_layers,
             "n_neurons": info.n_neurons, "max_positions": info.max_positions}
    if cfg.units.kind != "mlp_neuron":  # n_neurons: the dictionaries' width; unit_layers, units: their source
        from workers.units.source import unit_shape

        shape.update(unit_shape(cfg, info.n_layers))
    return shape


def build_plan(cfg: SweepConfig, shape: dict) -> Plan:
    from workers.method import check_config

    check_config(cfg)  # scorer and simulator-mode names, against the method's registries
    cfg.check_against_model(shape["n_layers"], shape["n_neurons"], shape.get("max_positions"))
    layers = shape.get("unit_layers") or cfg.layer_list(shape["n_layers"])
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
    """Plan the sweep and write run.json; for an existing run, refuse a config that would change results, and a
    run directory that does not match its run.json (`check_run_directory`)."""
    existing = read_run_file(store) if store.exists(RUN_FILE) else None
    shape = model_shape(cfg, store)
    plan = build_plan(cfg, shape)
    check_extracted_layers(plan, store)
    new = stored_config(cfg)
    if existing is not None:
        old = existing["config"]
        refuse_changes(old, new, cfg.output)
        if shape.get("units"):  # the same path may hold another dictionary now (its weights' sha256 differs)
            from workers.units.source import check_same_source

            check_same_source((existing.get("model") or {}).get("units"), shape["units"], cfg.output)
        check_run_directory(plan, store)
    else:
        check_run_directory(plan, store)  # an extraction or import may be there already
        store.write_json(RUN_FILE, {
            "config": new,
            "model": shape,
            "plan": {"n_neurons": plan.n_neurons, "n_shards": len(plan.shards), "shard_size": cfg.shard_size},
            "versions": versions(),
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat(),
        })
    return plan


def with_defaults(stored: dict, defaults: dict) -> dict:
    """`stored` with every key it lacks taken from `defaults`, at every depth: a run.json written before a field
    existed holds that field's default (that is what the run used), so it is no change."""
    out = dict(stored)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = with_defaults(out[key], value)
    return out


def refuse_changes(old: dict, new: dict, output: str) -> None:
    """Raise a ConfigError naming the result-changing fields that differ between run.json's config and `new`."""
    old = with_defaults(old, SweepConfig().model_dump(mode="json"))
    changed = config_diff(old, new)
    if changed:
        detail = ", ".join(f"{f} ({_get(old, f)!r} -> {_get(new, f)!r})" for f in changed[:6])
        raise ConfigError(
            f"run directory {output} was started with a different config; changed: {detail}. "
            f"Use the same config (`neuronsweep resume {output}`) or a new --out directory")


# --- endpoints: where a key may be sent --------------------------------------------------------------------------
ROLES = ("explainer", "simulator")
ENDPOINT_FIELDS = ("base_url", "api_key_env")  # where requests go, and which variable's value they carry


def stored_config(cfg: SweepConfig) -> dict:
    """The config as run.json stores it: each endpoint URL without the credentials it may carry."""
    from workers.llm.redact import redact_url, url_secrets

    data = cfg.model_dump(mode="json")
    for role in ROLES:
        url = data[role].get("base_url")
        if url and url_secrets(url):
            data[role]["base_url"] = redact_url(url)
    return data


def explicit_fields(model, prefix: str = "") -> set[str]:
    """Dotted names of the fields of a config that were given (config file, --set, flags), not defaulted."""
    out = set()
    for name in model.model_fields_set:
        value = getattr(model, name)
        if hasattr(value, "model_fields_set"):
            out |= explicit_fields(value, f"{prefix}{name}.")
        else:
            out.add(f"{prefix}{name}")
    return out


def config_for_run(run_config: dict, user: SweepConfig, *, output: str) -> SweepConfig:
    """The config to continue a run with (`resume`, `explain`): run.json's, with the fields the user gave on top
    (a result-changing one that differs is refused). Endpoints (`base_url`) and key variables (`api_key_env`) of
    an `openai` backend are never taken from run.json, which anyone who can write the run directory can edit: each
    comes from the user, and where the user gave none, run.json's must be the default, else it must be confirmed."""
    from workers.llm.redact import redact_url

    data = copy.deepcopy(run_config)
    given = explicit_fields(user)
    mine = user.model_dump(mode="json")
    for name in sorted(given):
        _set(data, name, _get(mine, name))
    for role in ROLES:
        for f in ENDPOINT_FIELDS:
            name = f"{role}.{f}"
            if name in given:
                continue
            stored, default = _get(run_config, name), _get(mine, name)
            same = (redact_url(stored) if stored else None) == (redact_url(default) if default else None) \
                if f == "base_url" else stored == default
            if not same and _get(data, f"{role}.kind") == "openai":
                raise ConfigError(
                    f"{name}: {RUN_FILE} names {stored!r}, but endpoints and API key variables are never taken from "
                    f"a run directory (whoever can edit it could send your key elsewhere); confirm it with "
                    f"--set {name}=... or --config with the run's config file")
            _set(data, name, default)
    data["output"] = output
    merged = SweepConfig.from_dict(data)
    refuse_changes(run_config, merged.model_dump(mode="json"), output)
    return merged


def load_run_config(store: RunStore) -> SweepConfig:
    """The config run.json holds (endpoints without their credentials: see `config_for_run`)."""
    return SweepConfig.from_dict(read_run_file(store)["config"])


# --- run.json and the run directory, read as untrusted input ---------------------------------------------------------
def plan_of_run(store: RunStore) -> Plan | None:
    """The plan run.json describes (its config over the model shape it stored), or None if it stored no shape."""
    doc = read_run_file(store)
    shape = doc.get("model")
    if not (isinstance(shape, dict) and isinstance(shape.get("n_layers"), int)
            and isinstance(shape.get("n_neurons"), int)):
        return None
    return build_plan(SweepConfig.from_dict(doc["config"]), shape)


def read_run_file(store: RunStore) -> dict:
    """run.json, checked: a JSON object with a valid config whose shard size is the one the run was cut with. A
    missing, damaged or inconsistent one is a one-line error naming the file and what to do."""
    if not store.exists(RUN_FILE):
        raise ConfigError(f"{store.root} is not a neuronsweep run directory (no {RUN_FILE})")
    path = store.path(RUN_FILE)
    doc = store.read_json(RUN_FILE)  # not JSON: DamagedFileError, naming it
    if not isinstance(doc, dict):
        raise damaged(path, RUN_FILE, "not a JSON object")
    if not isinstance(doc.get("config"), dict):
        raise damaged(path, RUN_FILE, "it holds no config")
    try:
        cfg = SweepConfig.from_dict(doc["config"])
    except ConfigError as e:
        raise damaged(path, RUN_FILE, f"its config is not valid: {e}") from None
    planned = doc.get("plan")
    cut = planned.get("shard_size") if isinstance(planned, dict) else None
    if isinstance(cut, int) and cut != cfg.shard_size:
        raise RunDirectoryError(
            f"{path}: config.shard_size is {cfg.shard_size}, but the run's shards were cut with {cut} "
            f"(plan.shard_size); set config.shard_size back to {cut} (a different size needs a new --out directory)")
    return doc


def check_run_directory(plan: Plan, store: RunStore) -> None:
    """The run directory holds what `plan` needs and nothing it contradicts: every committed shard is one of the
    plan's (`check_committed_shards`), and a finished extraction's `sequences/` and records are there, with no
    stray file among the records."""
    check_committed_shards(plan, store)
    check_extraction_outputs(plan, store)


def check_committed_shards(plan: Plan, store: RunStore) -> None:
    """Every committed shard is one of `plan`'s: else run.json's layers, neurons or shard size were edited, and a
    sweep would do their neurons again under new shard ids (duplicate rows; `done` passing `planned`)."""
    planned = {s.shard_id for s in plan.shards}
    committed = [i for i in (marker_shard_id(p) for p in store.list_files(MARKERS_DIR)) if i is not None]
    stray = sorted(set(committed) - planned)
    if stray:
        raise RunDirectoryError(
            f"{store.path(shard_marker(stray[0]))}: committed shard {stray[0]} is not one of this run's shards "
            f"({len(stray)} of {len(committed)} committed shards are not): the layers, neurons or shard_size in "
            f"{RUN_FILE} differ from the ones the run was started with; set them back (or use a new --out "
            f"directory)")


def check_extraction_outputs(plan: Plan, store: RunStore) -> None:
    """A finished extraction's `sequences/` and the records of every planned layer are there, and nothing else is
    among the records."""
    if not store.exists(EXTRACT_MARKER):
        return
    marker = store.read_json(EXTRACT_MARKER)
    if not isinstance(marker, dict) or not marker.get("n_windows"):
        return  # a synthetic run (no records of its own), or a marker from before it counted windows
    if not any(p.endswith(".parquet") for p in store.list_files("sequences")):
        raise RunDirectoryError(
            f"{store.path('sequences')} is missing or empty, but {EXTRACT_MARKER} says the extraction stored "
            f"{marker['n_windows']:,} windows there (the records' tokens); restore it from a copy of the run, or "
            f"extract again into a new --out directory")
    files = store.list_files("records")
    for layer in sorted({s.layer for s in plan.shards}):
        base = store.path(partition_dir("records", layer))
        mine = [p for p in files if p.startswith(base + "/") and not is_hidden(p[len(base):])]
        for path in mine:
            if not RECORDS_NAME.fullmatch(path.rsplit("/", 1)[-1]):
                raise RunDirectoryError(
                    f"{path} is not a records file of this run (they are named nAAAAAA-BBBBBB.parquet); move it "
                    f"out of the run directory")
        if not mine:
            raise RunDirectoryError(
                f"{base} holds no records, but {EXTRACT_MARKER} says layer {layer} was extracted; restore it from a "
                f"copy of the run, or extract again into a new --out directory")


RECORDS_NAME = re.compile(r"n\d{6,}-\d{6,}\.parquet")  # schemas/layout.py's records_file


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
    value: object = d
    for k in dotted.split("."):
        value = value.get(k) if isinstance(value, dict) else None
    return value


def _set(d: dict, dotted: str, value) -> None:
    *parents, last = dotted.split(".")
    for k in parents:
        d = d.setdefault(k, {})
    d[last] = value
