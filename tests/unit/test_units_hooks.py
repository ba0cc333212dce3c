"""Hook names placed in Hugging Face modules: what a capture at each hook point sees equals the residual stream
or MLP output computed independently (the model's own hidden states, the block's modules called directly),
for every architecture family of the registry."""
import pytest
import torch

from workers.models.registry import FAMILIES
from workers.units import UnitsError
from workers.units.hooks import BLOCK_PARTS, TL_HOOKS, as_btd, parallel_block, register_capture, resolve_hook

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
             intermediate_size=64, n_embd=32, n_layer=2, n_head=2, n_inner=64, ffn_dim=64, head_dim=16,
             max_position_embeddings=64, n_positions=64, rotary_dim=8, word_embed_proj_dim=32,
             bos_token_id=0, eos_token_id=0, pad_token_id=0)


def _capture(model, names, ids, kind="sae"):
    caps, handles = {}, []
    b, t = ids.shape
    for name in names:
        hp = resolve_hook(model, name, kind)
        handles.append(register_capture(model, hp, lambda x, n=name: caps.__setitem__(n, as_btd(x, b, t).clone())))
    try:
        with torch.no_grad():
            out = model(input_ids=ids, output_hidden_states=True)
    finally:
        for h in handles:
            h.remove()
    return caps, out.hidden_states


@pytest.mark.parametrize("arch", sorted(FAMILIES))
def test_residual_stream_hooks_in_every_family(arch):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(arch, **SMALL)).eval()
    ids = torch.randint(1, 100, (2, 7))
    mid = not parallel_block(model.config)
    names = [f"blocks.{layer}.{h}" for layer in (0, 1) for h in TL_HOOKS if mid or h != "hook_resid_mid"]
    caps, hidden = _capture(model, names, ids)
    for layer in (0, 1):
        assert torch.equal(caps[f"blocks.{layer}.hook_resid_pre"], hidden[layer])
    # HF's last hidden state is after the final norm, so layer 0's output is the one to compare
    assert torch.equal(caps["blocks.0.hook_resid_post"], hidden[1])
    if mid:
        assert torch.allclose(caps["blocks.0.hook_resid_mid"] + caps["blocks.0.hook_mlp_out"], hidden[1], atol=1e-6)
    else:
        with pytest.raises(UnitsError, match="in parallel"):
            resolve_hook(model, "blocks.0.hook_resid_mid")


@pytest.mark.parametrize("fixture, block, prefix", [("tiny_gpt2", "transformer.h", "h"),
                                                    ("tiny_llama", "model.layers", "layers")])
def test_mlp_hooks_equal_the_blocks_own_modules(request, fixture, block, prefix):
    loaded = request.getfixturevalue(fixture)
    model = loaded.model
    parts = BLOCK_PARTS[model.config.model_type]
    ids = torch.randint(0, 500, (2, 9))
    names = ["blocks.1.hook_resid_mid", "blocks.1.ln2.hook_normalized", "blocks.1.hook_mlp_out",
             "blocks.1.hook_resid_post", f"{prefix}.1", f"{prefix}.1.mlp"]
    caps, hidden = _capture(model, names, ids)
    layer = model.get_submodule(f"{block}.1")
    with torch.no_grad():
        normalized = layer.get_submodule(parts.ln2)(caps["blocks.1.hook_resid_mid"])
        mlp_out = layer.get_submodule(parts.mlp_in)(normalized)
    assert torch.equal(caps["blocks.1.ln2.hook_normalized"], normalized)
    assert torch.equal(caps["blocks.1.hook_mlp_out"], mlp_out)
    assert torch.allclose(caps["blocks.1.hook_resid_mid"] + mlp_out, caps["blocks.1.hook_resid_post"], atol=1e-6)
    # sparsify's names: a layer's output is its residual stream out, the mlp module's output the MLP output
    assert torch.equal(caps[f"{prefix}.1"], caps["blocks.1.hook_resid_post"])
    assert torch.equal(caps[f"{prefix}.1.mlp"], mlp_out)
    # a sparsify transcoder reads its module's input: the MLP's input is the normalized residual stream
    tc, _ = _capture(model, [f"{prefix}.1.mlp"], ids, kind="transcoder")
    assert torch.equal(tc[f"{prefix}.1.mlp"], normalized)


@pytest.mark.parametrize("name, message", [
    ("blocks.7.hook_resid_post", "layer 7 is out of range; this model has 2 layers (allowed: 0..1)"),
    ("blocks.0.hook_attn_out", "is not a hook point this tool knows"),
    ("layers.0.nope", "the model has no module 'model.layers.0.nope'"),
    ("h.0", "is not a hook point this tool knows"),
])
def test_unknown_hooks_are_one_line_errors(tiny_llama, name, message):
    with pytest.raises(UnitsError) as e:
        resolve_hook(tiny_llama.model, name)
    assert message in str(e.value) and "\n" not in str(e.value)
