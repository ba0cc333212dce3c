"""Hook names -> the Hugging Face module (and side) whose input or output carries those activations.

Two naming schemes are read, the ones dictionaries are published with:
- TransformerLens / SAELens: `blocks.L.hook_resid_pre` (the decoder layer's input), `blocks.L.hook_resid_mid`
  (the residual stream between attention and MLP: the input of the pre-MLP norm), `blocks.L.hook_resid_post`
  (the layer's output), `blocks.L.ln2.hook_normalized` (the pre-MLP norm's output: the MLP's input),
  `blocks.L.hook_mlp_out` (what the MLP block adds to the residual stream; Gemma 2/3 norm it after the MLP).
- sparsify: a module's name under the base model (`layers.L`, `layers.L.mlp`, GPT-2's `h.L.mlp`): its output for
  an SAE, its input for a transcoder (sparsify trains transcoders on a module's input -> output).
Families whose attention and MLP read the same input (GPT-J, GPT-NeoX with parallel residual) have no
`hook_resid_mid`; asking for it is an error.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from workers.models.registry import FAMILIES, family_of
from workers.units import UnitsError


@dataclass(frozen=True)
class BlockParts:
    """Module paths inside one decoder layer: the pre-MLP norm (None where attention and MLP share the input
    norm), the module whose input is the MLP's input, the one whose output is what the MLP adds to the residual
    stream."""
    ln2: str | None
    mlp_in: str
    mlp_out: str


_LLAMA_PARTS = BlockParts("post_attention_layernorm", "mlp", "mlp")
_GEMMA2_PARTS = BlockParts("pre_feedforward_layernorm", "mlp", "post_feedforward_layernorm")

# model_type -> its decoder layer's parts; every family of workers/models/registry.py has a row
BLOCK_PARTS: dict[str, BlockParts] = {
    "gpt2": BlockParts("ln_2", "mlp", "mlp"),
    "gptj": BlockParts(None, "mlp", "mlp"),
    "gpt_neox": BlockParts("post_attention_layernorm", "mlp", "mlp"),
    "opt": BlockParts("final_layer_norm", "fc1", "fc2"),
    "llama": _LLAMA_PARTS, "mistral": _LLAMA_PARTS, "qwen2": _LLAMA_PARTS, "qwen3": _LLAMA_PARTS,
    "gemma": _LLAMA_PARTS, "phi3": _LLAMA_PARTS,
    "gemma2": _GEMMA2_PARTS, "gemma3_text": _GEMMA2_PARTS,
}
assert set(BLOCK_PARTS) == set(FAMILIES), "every registry family needs its block parts"

TL_HOOKS = ("hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_mlp_out", "ln2.hook_normalized")
_TL = re.compile(r"blocks\.(\d+)\.(" + "|".join(re.escape(h) for h in TL_HOOKS) + r")")
EXAMPLES = "blocks.3.hook_resid_post, blocks.3.ln2.hook_normalized, layers.3, layers.3.mlp"


@dataclass(frozen=True)
class HookPoint:
    """Where a dictionary reads: `module` (a path from the model's root) and `side` (its input or output)."""
    name: str
    layer: int
    module: str
    side: str  # input | output


def parallel_block(config) -> bool:
    """Attention and MLP read the same input (no residual stream between them)."""
    arch = config.model_type
    return arch == "gptj" or (arch == "gpt_neox" and getattr(config, "use_parallel_residual", True))


def resolve_hook(model: torch.nn.Module, name: str, kind: str = "sae") -> HookPoint:
    """The module and side that carry the activations of hook `name` in `model` (a transcoder reads a sparsify
    module's input; everything else reads what the name says)."""
    config = getattr(model, "config")  # noqa: B009 - typed as Any (nn.Module's __getattr__ says Tensor | Module)
    family = family_of(config)
    n_layers = sum(1 for _ in model.get_submodule(family.layers).children())
    m = _TL.fullmatch(name)
    if m:
        layer, hook = int(m.group(1)), m.group(2)
        _check_layer(name, layer, n_layers)
        block = f"{family.layers}.{layer}"
        parts = BLOCK_PARTS[config.model_type]
        if hook == "hook_resid_pre":
            return HookPoint(name, layer, block, "input")
        if hook == "hook_resid_post":
            return HookPoint(name, layer, block, "output")
        if hook == "hook_mlp_out":
            return HookPoint(name, layer, f"{block}.{parts.mlp_out}", "output")
        if not getattr(config, "do_layer_norm_before", True):  # OPT-350m: norms after attention and MLP
            raise UnitsError(f"units.hook: {name}: this model normalizes after each block (OPT-350m), so only "
                             f"hook_resid_pre and hook_resid_post are defined")
        if hook == "ln2.hook_normalized":
            return HookPoint(name, layer, f"{block}.{parts.mlp_in}", "input")
        if parallel_block(config) or parts.ln2 is None:
            raise UnitsError(f"units.hook: {name}: {config.model_type} runs attention and MLP in parallel, "
                             f"so it has no residual stream between them (use hook_resid_pre or hook_resid_post)")
        return HookPoint(name, layer, f"{block}.{parts.ln2}", "input")
    # sparsify: a module name under the base model
    base = _base_prefix(model)
    rel_layers = family.layers.removeprefix(base)
    m = re.fullmatch(re.escape(rel_layers) + r"\.(\d+)((?:\.[A-Za-z_][\w]*)*)", name)
    if not m:
        raise UnitsError(f"units.hook: {name!r} is not a hook point this tool knows (e.g. {EXAMPLES}; sparsify "
                         f"names are modules under {rel_layers}.L)")
    layer = int(m.group(1))
    _check_layer(name, layer, n_layers)
    path = base + name
    try:
        model.get_submodule(path)
    except AttributeError:
        raise UnitsError(f"units.hook: {name}: the model has no module {path!r}") from None
    return HookPoint(name, layer, path, "input" if kind == "transcoder" else "output")


def _check_layer(name: str, layer: int, n_layers: int) -> None:
    if layer >= n_layers:
        raise UnitsError(f"units.hook: {name}: layer {layer} is out of range; this model has {n_layers} layers "
                         f"(allowed: 0..{n_layers - 1})")


def _base_prefix(model: torch.nn.Module) -> str:
    """The base model's path from the root plus a dot ('model.', 'transformer.'), or '' if it is the root."""
    base = model.base_model
    if base is model:
        return ""
    for name, module in model.named_children():
        if module is base:
            return name + "."
    return ""


def hook_width(model: torch.nn.Module, hp: HookPoint) -> int | None:
    """Width of the activations at `hp`: the hidden size for every residual-stream and MLP-boundary point, a
    linear layer's in/out features, else None (checked on the first batch)."""
    module = model.get_submodule(hp.module)
    if isinstance(module, torch.nn.Linear):
        return module.in_features if hp.side == "input" else module.out_features
    config = getattr(model, "config")  # noqa: B009 - Any, as above
    family = family_of(config)
    parts = BLOCK_PARTS[config.model_type]
    block = hp.module.removeprefix(f"{family.layers}.{hp.layer}")
    if block in ("", f".{parts.mlp_in}", f".{parts.mlp_out}") or (parts.ln2 and block == f".{parts.ln2}"):
        return int(config.hidden_size)
    return None


def first_tensor(args: tuple, kwargs: dict) -> torch.Tensor:
    """The activations a module was called with: its first positional argument, or `hidden_states`."""
    if args and isinstance(args[0], torch.Tensor):
        return args[0]
    x = kwargs.get("hidden_states")
    if isinstance(x, torch.Tensor):
        return x
    raise UnitsError("units.hook: the hooked module was called without its activations as first argument")


def as_btd(x: torch.Tensor, b: int, t: int) -> torch.Tensor:
    """Captured activations as [B, T, d]: OPT runs its MLP on [B*T, d] rows."""
    return x if x.dim() == 3 else x.view(b, t, -1)


def output_tensor(output) -> torch.Tensor:
    """A module's output activations (decoder layers of some versions return a tuple, the activations first)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def register_capture(model: torch.nn.Module, hp: HookPoint, fn) -> torch.utils.hooks.RemovableHandle:
    """Call fn(activations [B, T, d]) at `hp` on every forward; fn's exceptions propagate (a stop signal)."""
    module = model.get_submodule(hp.module)

    def pre(mod, args, kwargs):  # returns None: the module's inputs stay as they are
        fn(first_tensor(args, kwargs))

    def post(mod, args, output):  # returns None: the module's output stays as it is
        fn(output_tensor(output))

    if hp.side == "input":
        return module.register_forward_pre_hook(pre, with_kwargs=True)
    return module.register_forward_hook(post)
