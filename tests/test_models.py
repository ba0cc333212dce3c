import pytest
import torch

from workers.models import (ARCHITECTURES, ModelLoadError, architecture_of, down_proj_modules, load_model,
                            model_info, tiny_model, wrap)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tiny_models_report_their_shape(kind):
    m = tiny_model(kind)
    assert (m.info.n_layers, m.info.n_neurons) == (2, 64)
    assert m.info.architecture == kind


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_down_proj_pre_hook_sees_the_neuron_activations(kind):
    """The pre-hook input of the down projection is the MLP hidden activation (SPEC §1), recomputed here by hand."""
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
        assert family in ARCHITECTURES


@pytest.mark.parametrize("family, cfg_kw", [
    ("gpt_neox", dict(hidden_size=16, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, vocab_size=50)),
    ("opt", dict(hidden_size=16, ffn_dim=40, num_hidden_layers=2, num_attention_heads=2, vocab_size=50,
                 word_embed_proj_dim=16)),
    ("gptj", dict(n_embd=16, n_layer=3, n_head=2, vocab_size=50, rotary_dim=4)),
    ("mistral", dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1, vocab_size=50)),
    ("qwen2", dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, vocab_size=50)),
    ("gemma", dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2,
                   num_key_value_heads=1, head_dim=8, vocab_size=50)),
])
def test_every_family_resolves_to_its_down_projection(family, cfg_kw):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(family, **cfg_kw)
    model = AutoModelForCausalLM.from_config(config)
    info = wrap(model, None, family).info
    projs = down_proj_modules(model)
    assert len(projs) == info.n_layers == cfg_kw.get("num_hidden_layers", cfg_kw.get("n_layer"))
    assert projs[0].in_features == info.n_neurons  # the hook's input width is the neuron count


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
