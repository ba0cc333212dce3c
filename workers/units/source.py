"""`load_units`: the config's dictionaries (or directions), each placed at its hook point in the subject model and
checked against it before any work: the hook exists, the dictionary's input width is the width there, one
dictionary per layer, every layer's dictionary of the same width (a layer's units are indexed 0..d_sae-1).

`units.path` is one dictionary's folder, or a folder of such folders (sparsify's layout: one per hook point,
named by it; SAELens folders side by side work too), or for directions a file. With several dictionaries,
`units.hook` picks one by its hook name; without it, all are loaded (every layer's SAE in the same pass).
"""
from __future__ import annotations

import functools
import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.units import UnitsError
from workers.units.dictionaries import (
    CFG_FILE,
    SAELENS_WEIGHTS,
    SPARSIFY_WEIGHTS,
    Dictionary,
    load_dictionary,
    load_directions,
)
from workers.units.hooks import HookPoint, hook_width, resolve_hook


@dataclass
class LayerUnits:
    hook: HookPoint
    dictionary: Dictionary


@dataclass
class UnitSet:
    """The units of a sweep: per layer, a hook point and the dictionary read there."""
    kind: str
    path: str
    by_layer: dict[int, LayerUnits]

    @property
    def layers(self) -> list[int]:
        return sorted(self.by_layer)

    @property
    def n_units(self) -> int:
        return next(iter(self.by_layer.values())).dictionary.d_sae

    def source(self) -> dict:
        """The unit source as recorded in run.json, the extraction plan and marker, and every table's metadata:
        kind, path, format, width (n_units), activation (and k), the hook of each layer, and `sha256`, the
        weights file's SHA-256 (`sha256sum sae_weights.safetensors` gives the same; with several dictionaries,
        the SHA-256 of their files' hex digests, one per line, in layer order)."""
        first = next(iter(self.by_layer.values())).dictionary
        digests = [file_sha256(weights_file(u.dictionary)) for _, u in sorted(self.by_layer.items())]
        out = {"kind": self.kind, "path": self.path, "format": first.format, "n_units": self.n_units,
               "activation": first.activation,
               "hooks": {str(layer): u.hook.name for layer, u in sorted(self.by_layer.items())},
               "sha256": digests[0] if len(digests) == 1 else
               hashlib.sha256("".join(d + "\n" for d in digests).encode()).hexdigest()}
        if first.k is not None:
            out["k"] = first.k
        return out


def mlp_neuron_source() -> dict:
    return {"kind": "mlp_neuron"}


def weights_file(d: Dictionary) -> Path:
    """The file a dictionary's weights are read from (a direction file is its own)."""
    if d.format == "directions":
        return Path(d.path)
    return Path(d.path) / (SAELENS_WEIGHTS if d.format == "saelens" else SPARSIFY_WEIGHTS)


def file_sha256(path: Path) -> str:
    st = path.stat()
    return _sha256(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _sha256(path: str, size: int, mtime_ns: int) -> str:
    """Cached by size and modification time: the planner and the extraction stage both record the source, and
    a dictionary of 10^5 latents is a file of gigabytes."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# recorded fields whose change means other latents under the same indices (a source recorded before a field
# existed lacks it: not a change)
SOURCE_FIELDS = ("kind", "format", "n_units", "activation", "k", "hooks", "sha256")


def check_same_source(recorded: dict | None, current: dict | None, where: str) -> None:
    """Refuse to continue a run (`where`: its directory) whose units were read from another dictionary than the
    one at the same path now: one line naming what changed."""
    if not recorded or not current:
        return
    changed = [f for f in SOURCE_FIELDS if f in recorded and recorded.get(f) != current.get(f)]
    if not changed:
        return
    detail = ", ".join(f"{f} {_short(recorded.get(f))!r} -> {_short(current.get(f))!r}" for f in changed)
    raise UnitsError(f"units: {where} was started with another dictionary than the one at "
                     f"{current.get('path')} now ({detail}); put the original back or use a new --out directory")


def _short(value):
    """A hex digest cut to 12 characters (enough to tell two apart in a message)."""
    return value[:12] if isinstance(value, str) and len(value) == 64 else value


def dictionary_folders(path: str | Path, hook: str | None) -> list[Path]:
    """The dictionary folders under `path`: itself if it holds a cfg.json, else its subfolders that do (only
    the one named `hook`, when there is one)."""
    root = Path(path)
    if (root / CFG_FILE).is_file():
        return [root]
    if not root.is_dir():
        raise UnitsError(f"units.path: {root} is not a folder (a dictionary's folder, or a folder of them)")
    subs = sorted((d for d in root.iterdir() if (d / CFG_FILE).is_file()), key=lambda d: _natural(d.name))
    if not subs:
        raise UnitsError(f"units.path: {root} holds no {CFG_FILE}, nor subfolders that do")
    if hook is not None and any(d.name == hook for d in subs):
        return [root / hook]
    return subs


def _natural(name: str) -> list:
    import re

    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


def load_units(units, model: torch.nn.Module, weights: bool = True) -> UnitSet:
    """The `units` config section (schemas.config.Units) loaded and placed in `model` (weights or a skeleton
    on the meta device: only its structure and config are read). weights=False reads the dictionaries'
    shapes only (the driver's checks, before any work)."""
    if units.kind == "mlp_neuron":
        raise UnitsError("units.kind: mlp_neuron has no dictionary to load")
    if units.kind == "direction":
        placed = [(load_directions(units.path), units.hook)]
    else:
        folders = dictionary_folders(units.path, units.hook)
        placed = []
        for folder in folders:
            d = load_dictionary(folder, units.format, units.kind, weights)
            if d.kind != units.kind:
                raise UnitsError(f"units.kind is {units.kind!r} but {folder} holds a {d.kind}")
            if len(folders) > 1 and units.hook is not None and d.hook != units.hook:
                continue
            placed.append((d, units.hook if len(folders) == 1 and units.hook else d.hook))
        if not placed:
            found = ", ".join(str(load_dictionary(f, units.format, units.kind, False).hook) for f in folders)
            raise UnitsError(f"units.hook: no dictionary under {units.path} reads at {units.hook!r} (found: {found})")
    by_layer: dict[int, LayerUnits] = {}
    for d, name in placed:
        if not name:
            raise UnitsError(f"units.hook: {d.path} does not name its hook point; set units.hook")
        hp = resolve_hook(model, name, d.kind)
        width = hook_width(model, hp)
        if width is not None and width != d.d_in:
            raise UnitsError(f"units.path: {d.path} reads {d.d_in}-wide activations, but {name} carries {width} "
                             f"in this model")
        if hp.layer in by_layer:
            raise UnitsError(f"units.path: two dictionaries read at layer {hp.layer} "
                             f"({by_layer[hp.layer].hook.name} and {name}); set units.hook to pick one")
        if units.fold_decoder_norm and d.kind != "direction":
            d = d.fold_decoder_norm()
        by_layer[hp.layer] = LayerUnits(hp, d)
    widths = {u.dictionary.d_sae for u in by_layer.values()}
    if len(widths) > 1:
        raise UnitsError(f"units.path: the dictionaries under {units.path} differ in width ({sorted(widths)}); "
                         f"one sweep takes dictionaries of one width (set units.hook to pick one)")
    return UnitSet(units.kind, str(units.path), by_layer)


def model_skeleton(name: str) -> torch.nn.Module:
    """The subject model's module tree without its weights (on the meta device), for placing hook points before
    any model is loaded; a registered model source's model is built as it is served."""
    from workers.models.loading import model_source, resolve_model_path

    source = model_source(name)
    if source is not None:
        return source(name).model
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(name))
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def check_layers(unit_set: UnitSet, requested: list[int] | None) -> list[int]:
    """The layers to extract: the dictionaries' layers, or those of `requested` (the config's `layers`, None for
    'all'), each of which must have a dictionary."""
    if requested is None:
        return unit_set.layers
    missing = [layer for layer in requested if layer not in unit_set.by_layer]
    if missing:
        raise UnitsError(f"layers: {','.join(map(str, missing))} has no dictionary (units at layers "
                         f"{','.join(map(str, unit_set.layers))})")
    return sorted(requested)


def unit_latents(d: Dictionary, x: torch.Tensor) -> torch.Tensor:
    """[B, T, d_in] activations at the hook -> [B, T, d_sae] latents, with the first position of every window
    set to 0: it is the model's attention sink (a BOS-like position with no context), where the residual stream
    is an outlier and latents fire for that reason alone; zeroed, it never makes a record or a maximum."""
    z = d.encode(x)
    z[:, 0] = 0
    return z


def worker_units(spec_units: dict | None, loaded) -> UnitSet | None:
    """The units of a CollectorSpec (`units`: the config section as a dict; None for MLP neurons), loaded on
    the model's device in its dtype."""
    if not spec_units or spec_units.get("kind", "mlp_neuron") == "mlp_neuron":
        return None
    from schemas.config import Units

    unit_set = load_units(Units(**spec_units), loaded.model)
    param = next(loaded.model.parameters())
    for u in unit_set.by_layer.values():
        u.dictionary = u.dictionary.to(param.device, param.dtype)
    return unit_set


def unit_shape(cfg, n_layers: int) -> dict:
    """For the driver, before any work: the units' width and layers (cfg.layers among the dictionaries'
    layers) and the unit source, from the dictionaries' headers and the model's skeleton."""
    unit_set = load_units(cfg.units, model_skeleton(cfg.model.name), weights=False)
    requested = None if cfg.layers == "all" else cfg.layer_list(n_layers)
    return {"n_neurons": unit_set.n_units, "unit_layers": check_layers(unit_set, requested),
            "units": unit_set.source()}
