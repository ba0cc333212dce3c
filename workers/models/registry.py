"""The architecture registry: one row per model family saying where its MLP neurons are.

A neuron is one unit of the input to an MLP block's down projection (docs/method.md §1), so every row names that
module; a forward pre-hook on it sees exactly the neuron activations. Where the row also knows how the block
computes that input (`mlp`), extraction fuses its reductions into that step instead (`mlp_split`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


class ModelLoadError(ValueError):
    pass


@dataclass(frozen=True)
class Family:
    layers: str  # path of the decoder layer list in the model
    down_proj: str  # the down projection inside one layer: its input is the layer's neurons
    width_fields: tuple[str, ...]  # config fields holding the MLP width, first set one wins
    # How the MLP block computes the neurons, by the names of its parts inside the block:
    #   "gated":       act(gate_proj(x)) * up_proj(x)               (gate_proj, up_proj, act, down_proj)
    #   "gated_fused": gate_up_proj(x) split in halves, up * act(gate)  (gate_up_proj, act, down_proj)
    #   "plain":       act(fc_in(x))                                  (fc_in, act, fc_out[, dropout])
    # None: read through the down projection's pre-hook (OPT keeps its MLP in the decoder layer itself).
    mlp: tuple[str, tuple[str, ...]] | None = None


_GATED = ("gated", ("gate_proj", "up_proj", "act_fn", "down_proj"))
_LLAMA_LIKE = Family("model.layers", "mlp.down_proj", ("intermediate_size",), _GATED)

# model_type -> where its neurons are
FAMILIES: dict[str, Family] = {
    "gpt2": Family("transformer.h", "mlp.c_proj", ("n_inner",), ("plain", ("c_fc", "act", "c_proj", "dropout"))),
    "gptj": Family("transformer.h", "mlp.fc_out", ("n_inner",), ("plain", ("fc_in", "act", "fc_out", "dropout"))),
    "gpt_neox": Family("gpt_neox.layers", "mlp.dense_4h_to_h", ("intermediate_size",),
                       ("plain", ("dense_h_to_4h", "act", "dense_4h_to_h"))),
    "opt": Family("model.decoder.layers", "fc2", ("ffn_dim",)),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "phi3": Family("model.layers", "mlp.down_proj", ("intermediate_size",),
                   ("gated_fused", ("gate_up_proj", "activation_fn", "down_proj"))),
}


def architecture_of(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in FAMILIES:
        raise ModelLoadError(f"unsupported architecture '{arch}'; supported: {', '.join(sorted(FAMILIES))}")
    return arch


def family_of(config) -> Family:
    return FAMILIES[architecture_of(config)]


def mlp_width(config) -> int:
    for name in family_of(config).width_fields:
        value = getattr(config, name, None)
        if value:
            return int(value)
    # GPT-2 / GPT-J leave n_inner unset to mean 4 x hidden size
    return 4 * int(config.hidden_size)


def max_positions_of(config) -> int | None:
    for name in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    return None


def down_proj_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    family = family_of(model.config)
    layers = model.get_submodule(family.layers)
    assert isinstance(layers, torch.nn.ModuleList), family.layers
    return [layer.get_submodule(family.down_proj) for layer in layers]


@dataclass(frozen=True)
class MlpSplit:
    """One MLP block cut where its neurons are: `inputs(x)` -> tensors, `elementwise(*tensors)` -> the neuron
    activations (the down projection's input), `output(h)` -> the block's output. Composed, they compute what
    the block's own forward does, op for op; `act` is the activation module (stateless in every family)."""
    module: torch.nn.Module
    kind: str
    act: torch.nn.Module
    inputs: Callable
    output: Callable

    def elementwise(self, *inputs: torch.Tensor) -> torch.Tensor:
        return elementwise_of(self.kind, self.act)(*inputs)


def elementwise_of(kind: str, act: torch.nn.Module) -> Callable:
    """The neuron step of an MLP shape as a plain function of its inputs (what extraction compiles)."""
    if kind == "gated":
        return lambda gate, up: act(gate) * up
    if kind == "gated_fused":
        return lambda gate, up: up * act(gate)
    return act


def mlp_split(model: torch.nn.Module, layer: int) -> MlpSplit | None:
    """The MLP block of `layer` as an `MlpSplit`, or None for families read through the pre-hook."""
    family = family_of(model.config)
    if family.mlp is None:
        return None
    kind, names = family.mlp
    layers = model.get_submodule(family.layers)
    assert isinstance(layers, torch.nn.ModuleList), family.layers
    mlp = layers[layer].get_submodule(family.down_proj.rsplit(".", 1)[0])
    parts = [getattr(mlp, name) for name in names]
    if kind == "gated":
        gate, up, act, down = parts
        return MlpSplit(mlp, kind, act, lambda x: (gate(x), up(x)), down)
    if kind == "gated_fused":
        gate_up, act, down = parts
        return MlpSplit(mlp, kind, act, lambda x: tuple(gate_up(x).chunk(2, dim=-1)), down)
    fc_in, act, fc_out, *dropout = parts
    post = dropout[0] if dropout else torch.nn.Identity()
    return MlpSplit(mlp, kind, act, lambda x: (fc_in(x),), lambda h: post(fc_out(h)))
