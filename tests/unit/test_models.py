import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from testing.models import tiny_model
from workers.models import loading, registry
from workers.models.loading import (
    MODEL_SOURCES_ENV,
    ModelLoadError,
    load_model,
    load_subject,
    load_tokenizer,
    model_info,
    model_source,
    register_model_source,
    wrap,
)
from workers.models.registry import architecture_of, down_proj_modules, mlp_split

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_models_report_their_shape(kind):
    m = tiny_model(kind)
    assert (m.info.n_layers, m.info.n_neurons) == (2, 64)
    assert m.info.architecture == kind


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_down_proj_pre_hook_sees_the_neuron_activations(kind):
    """The pre-hook input of the down projection is the MLP hidden activation (docs/method.md §1), recomputed here
    by hand."""
    m = tiny_model(kind)
    seen = {}
    layer = 1
    mlp = m.model.transformer.h[layer].mlp if kind == "gpt2" else m.model.model.layers[layer].mlp
    hook = m.down_proj(layer).register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0]))
    mlp_in = {}
    hook2 = mlp.register_forward_pre_hook(lambda mod, args: mlp_in.__setitem__("x", args[0]))
    ids = torch.tensor([[1, 5, 9, 30, 2]])
    with torch.no_grad():
        m.model(ids)
        x = mlp_in["x"]
        if kind == "gpt2":
            want = mlp.act(mlp.c_fc(x))
        else:
            want = mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x)
    hook.remove(), hook2.remove()
    assert seen["x"].shape == (1, 5, 64)
    torch.testing.assert_close(seen["x"], want)


def test_registry_covers_the_required_families():
    for family in ["gpt2", "llama", "mistral", "qwen2", "gpt_neox", "opt", "gemma", "gptj"]:
        assert family in registry.FAMILIES


_GQA = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            vocab_size=50)
FAMILIES = [
    ("gpt_neox", dict(hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)),
    ("opt", dict(hidden_size=16, ffn_dim=40, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
                 word_embed_proj_dim=16)),
    ("gptj", dict(n_embd=16, n_layer=3, n_head=2, vocab_size=50, rotary_dim=4)),
    ("gpt2", dict(n_embd=16, n_layer=2, n_head=2, n_inner=40, vocab_size=50)),
    ("llama", _GQA),
    ("mistral", _GQA),
    ("qwen2", _GQA),
    ("qwen3", dict(_GQA, head_dim=8)),
    ("gemma", dict(_GQA, head_dim=8)),
    ("gemma2", dict(_GQA, head_dim=8)),
    ("gemma3_text", dict(_GQA, head_dim=8)),
    ("phi3", dict(_GQA, pad_token_id=0)),
]


def family_model(family, cfg_kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **cfg_kw)).eval()


@pytest.mark.parametrize("family, cfg_kw", FAMILIES)
def test_every_family_resolves_to_its_down_projection(family, cfg_kw):
    model = family_model(family, cfg_kw)
    info = wrap(model, None, family).info
    projs = down_proj_modules(model)
    assert len(projs) == info.n_layers == cfg_kw.get("num_hidden_layers", cfg_kw.get("n_layer"))
    in_width = projs[0].nx if family == "gpt2" else projs[0].in_features  # GPT-2's Conv1D names it nx
    assert in_width == info.n_neurons  # the hook's input width is the neuron count


@pytest.mark.parametrize("family, cfg_kw", FAMILIES)
def test_the_mlp_split_computes_what_the_block_does(family, cfg_kw):
    """Extraction replaces a block's forward by inputs -> elementwise -> output: the neurons must be the down
    projection's input and the block's output unchanged, bit for bit."""
    model = family_model(family, cfg_kw)
    for layer, proj in enumerate(down_proj_modules(model)):
        split = mlp_split(model, layer)
        if registry.FAMILIES[family].mlp is None:
            assert split is None  # read through the pre-hook instead
            continue
        x = torch.randn(2, 3, model.config.hidden_size)
        seen: list[torch.Tensor] = []
        hook = proj.register_forward_pre_hook(lambda m, args, seen=seen: seen.append(args[0]))
        with torch.no_grad():
            want = split.module(x)
            acts = split.elementwise(*split.inputs(x))
            got = split.output(acts)
        hook.remove()
        assert len(seen) == 2  # the block's forward, then `output`, both through the down projection
        assert torch.equal(acts, seen[0]) and torch.equal(got, want)


def test_unsupported_architecture_lists_supported():
    class Cfg:
        model_type = "mamba"
    with pytest.raises(ModelLoadError, match="unsupported architecture 'mamba'; supported: .*gpt2.*llama"):
        architecture_of(Cfg())


def test_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="model.name: cannot load"):
        load_model(str(tmp_path / "nope"))


@pytest.mark.real_model
def test_default_model_is_smollm2_30_by_1536(default_model):
    assert default_model.info.architecture == "llama"
    assert (default_model.info.n_layers, default_model.info.n_neurons) == (30, 1536)
    assert model_info().total_neurons == 46_080
    tok = default_model.tokenizer
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        logits = default_model.model(ids).logits[0, -1]
    assert tok.decode(int(logits.argmax())).strip() == "Paris"  # the weights are real, not random


# --- model sources ----------------------------------------------------------------------------------------------
@pytest.fixture
def sources(monkeypatch):
    """The registered sources, restored after the test (registration is process-wide)."""
    monkeypatch.setattr(loading, "_SOURCES", dict(loading._SOURCES))
    return loading._SOURCES


def test_a_registered_source_serves_its_names_and_the_longest_prefix_wins(sources):
    def build(kind):
        return lambda name: tiny_model(kind)

    register_model_source("toy-", build("gpt2"))
    register_model_source("toy-llama", build("llama"))
    assert load_subject("toy-anything").info.architecture == "gpt2"
    assert load_subject("toy-llama-2").info.architecture == "llama"
    assert model_info("toy-llama").n_neurons == 64
    assert load_tokenizer("toy-x").eos_token == "<|endoftext|>"
    assert model_source("other-model") is None
    with pytest.raises(ValueError, match="prefix must not be empty"):
        register_model_source("", build("gpt2"))


def test_tiny_names_are_served_once_testing_models_is_registered():
    m = load_subject("tiny-llama", dtype="bfloat16", device="cpu")
    assert m.info.name == "tiny-llama" and (m.info.n_layers, m.info.n_neurons, m.info.dtype) == (2, 64, "float32")
    with pytest.raises(ModelLoadError, match="tiny model kind 'bert' is unknown"):
        load_subject("tiny-bert")


def _model_info_in_a_fresh_process(sources_env: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != MODEL_SOURCES_ENV} | {"HF_HUB_OFFLINE": "1"}
    if sources_env is not None:
        env[MODEL_SOURCES_ENV] = sources_env
    code = "from workers.models.loading import model_info; print(model_info('tiny-gpt2').n_neurons)"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                          timeout=300)


def test_a_fresh_process_finds_the_sources_named_in_the_environment():
    """What a CLI subprocess of a test sees: the variable alone makes `tiny-` names loadable, and without it
    they are not (nothing in the product knows them)."""
    with_it = _model_info_in_a_fresh_process("testing.models")
    assert with_it.returncode == 0, with_it.stderr[-2000:]
    assert with_it.stdout.strip() == "64"
    without = _model_info_in_a_fresh_process(None)
    assert without.returncode != 0 and "model.name: cannot load 'tiny-gpt2'" in without.stderr


def test_an_unimportable_source_module_is_a_clear_error(sources, monkeypatch):
    monkeypatch.setenv(MODEL_SOURCES_ENV, "testing.models, no_such_module_here")
    with pytest.raises(ModelLoadError, match=f"{MODEL_SOURCES_ENV}: cannot import model source module "
                                             "'no_such_module_here'"):
        model_info("tiny-gpt2")


def test_a_driver_joining_a_cluster_hands_its_model_sources_to_the_workers(monkeypatch):
    """Workers of a remote cluster do not inherit the driver's environment; a local cluster's do."""
    import ray

    from orchestrator.ray_session import init_ray
    from schemas.config import SweepConfig

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.setenv(MODEL_SOURCES_ENV, "testing.models")
    assert init_ray(SweepConfig(ray_address="ray://head:10001"))
    assert init_ray(SweepConfig())
    assert calls[0]["runtime_env"] == {"env_vars": {MODEL_SOURCES_ENV: "testing.models"}}
    assert "runtime_env" not in calls[1]
