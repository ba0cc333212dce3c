import pytest
import torch

from workers.models.loading import (ARCHITECTURES, MLP_SHAPES, ModelLoadError, architecture_of, down_proj_modules,
                            load_model, mlp_split, model_info, tiny_model, wrap)


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
        if family not in MLP_SHAPES:
            assert split is None  # read through the pre-hook instead
            continue
        x = torch.randn(2, 3, model.config.hidden_size)
        seen = []
        hook = proj.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
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
