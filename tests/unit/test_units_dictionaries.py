"""Dictionaries read from the SAELens and sparsify layouts and direction files, and their encoders, against
hand-worked numbers; every malformed input is a one-line UnitsError."""
import json

import numpy as np
import pytest
import torch

from workers.units import UnitsError
from workers.units.dictionaries import load_dictionary, load_directions, save_saelens, save_sparsify

# d_in = 2, d_sae = 3. With b_dec = [1, 1] subtracted, x = [3, 2] becomes [2, 1], and
# pre = [2, 1] @ W_enc + b_enc = [2 + 0, 0 + 1 - 0.5, 2 - 1 + 0] = [2, 0.5, 1].
W_ENC = torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, -1.0]])
B_ENC = torch.tensor([0.0, -0.5, 0.0])
B_DEC = torch.tensor([1.0, 1.0])
W_DEC = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.5]])  # row norms 2, 1, 0.5
X = torch.tensor([[3.0, 2.0]])


def _saelens(tmp_path, **kw):
    args = dict(W_enc=W_ENC, b_enc=B_ENC, W_dec=W_DEC, b_dec=B_DEC, hook_name="blocks.0.hook_resid_post")
    return load_dictionary(save_saelens(tmp_path / "sae", **{**args, **kw}))


def test_saelens_standard_relu_subtracts_b_dec(tmp_path):
    d = _saelens(tmp_path)
    assert (d.format, d.kind, d.activation, d.hook, d.d_in, d.d_sae) == \
        ("saelens", "sae", "relu", "blocks.0.hook_resid_post", 2, 3)
    assert d.encode(X).tolist() == [[2.0, 0.5, 1.0]]
    # pre of [-3, 0] - b_dec = [-4, -1] is [-4, -1.5, -3]: all cut by the ReLU
    assert d.encode(torch.tensor([[-3.0, 0.0]])).tolist() == [[0.0, 0.0, 0.0]]


def test_saelens_without_b_dec_on_input(tmp_path):
    d = _saelens(tmp_path, apply_b_dec_to_input=False)
    assert d.encode(X).tolist() == [[3.0, 1.5, 1.0]]  # [3, 2] @ W_enc + b_enc


def test_saelens_jumprelu_threshold(tmp_path):
    d = _saelens(tmp_path, architecture="jumprelu", threshold=torch.tensor([2.5, 0.1, 1.0]))
    # pre [2, 0.5, 1] > [2.5, 0.1, 1.0]: only the middle one (1 > 1 is false)
    assert d.encode(X).tolist() == [[0.0, 0.5, 0.0]]


def test_saelens_topk_keeps_k_largest(tmp_path):
    d = _saelens(tmp_path, architecture="topk", k=2)
    assert d.encode(X).tolist() == [[2.0, 0.0, 1.0]]


def test_folded_decoder_norm_scales_latents(tmp_path):
    d = _saelens(tmp_path).fold_decoder_norm()
    assert d.encode(X).tolist() == [[4.0, 0.5, 0.5]]  # [2, 0.5, 1] * norms [2, 1, 0.5]


def test_older_saelens_cfg_without_architecture(tmp_path):
    folder = save_saelens(tmp_path / "old", W_enc=W_ENC, b_enc=B_ENC, W_dec=W_DEC, b_dec=B_DEC,
                          hook_name="blocks.1.hook_resid_pre", architecture="topk", k=1)
    cfg = json.loads((folder / "cfg.json").read_text())
    for key in ("architecture", "k", "metadata"):
        del cfg[key]
    cfg |= {"activation_fn_str": "topk", "activation_fn_kwargs": {"k": 1}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    d = load_dictionary(folder)
    assert (d.activation, d.k, d.hook) == ("topk", 1, "blocks.1.hook_resid_pre")
    assert d.encode(X).tolist() == [[2.0, 0.0, 0.0]]


def test_saelens_transcoder_never_subtracts_b_dec(tmp_path):
    d = _saelens(tmp_path, architecture="transcoder", b_dec=torch.tensor([5.0, 5.0]))
    assert d.kind == "transcoder"
    assert d.encode(X).tolist() == [[3.0, 1.5, 1.0]]


def test_sparsify_topk(tmp_path):
    folder = save_sparsify(tmp_path, "layers.0", encoder_weight=W_ENC.T, encoder_bias=B_ENC, W_dec=W_DEC,
                           b_dec=B_DEC, k=2)
    d = load_dictionary(folder)
    assert (d.format, d.activation, d.k, d.hook, d.d_sae) == ("sparsify", "topk", 2, "layers.0", 3)
    assert d.encode(X).tolist() == [[2.0, 0.0, 1.0]]


def test_sparsify_transcoder_reads_raw_input(tmp_path):
    folder = save_sparsify(tmp_path, "layers.0.mlp", encoder_weight=W_ENC.T, encoder_bias=B_ENC, W_dec=W_DEC,
                           b_dec=B_DEC, k=3, transcode=True)
    d = load_dictionary(folder)
    assert d.kind == "transcoder"
    assert d.encode(X).tolist() == [[3.0, 1.5, 1.0]]


def test_both_layouts_encode_alike(tmp_path):
    torch.manual_seed(0)
    w, b, bd = torch.randn(8, 32), torch.randn(32), torch.randn(8)
    a = load_dictionary(save_saelens(tmp_path / "a", W_enc=w, b_enc=b, W_dec=w.T, b_dec=bd, hook_name="layers.0",
                                     architecture="topk", k=4))
    s = load_dictionary(save_sparsify(tmp_path / "s", "layers.0", encoder_weight=w.T, encoder_bias=b, W_dec=w.T,
                                      b_dec=bd, k=4))
    x = torch.randn(5, 7, 8)
    za, zs = a.encode(x), s.encode(x)
    assert torch.equal(za, zs)
    assert ((za > 0).sum(-1) <= 4).all()


def test_directions_project_on_unit_vectors(tmp_path):
    f = tmp_path / "d.npy"
    np.save(f, np.array([[3.0, 4.0], [0.0, -2.0]], dtype=np.float32))
    d = load_directions(f)
    assert (d.kind, d.d_in, d.d_sae) == ("direction", 2, 2)
    assert torch.allclose(d.encode(X), torch.tensor([[3.4, -2.0]]))  # [3, 2] . [0.6, 0.8] and . [0, -1]


def test_directions_from_safetensors(tmp_path):
    from safetensors.torch import save_file

    f = tmp_path / "d.safetensors"
    save_file({"directions": torch.tensor([[0.0, 5.0]]), "other": torch.zeros(1)}, str(f))
    assert load_directions(f).encode(X).tolist() == [[2.0]]


@pytest.mark.parametrize("mutate, message", [
    (lambda f: (f / "cfg.json").unlink(), "no cfg.json in"),
    (lambda f: (f / "cfg.json").write_text("[1]"), "must hold a JSON object"),
    (lambda f: _edit_cfg(f, d_sae=4), "W_enc has shape [2, 3], expected [2, 4]"),
    (lambda f: _edit_cfg(f, architecture="gated"), "architecture 'gated' is not supported"),
    (lambda f: _edit_cfg(f, normalize_activations="expected_average_only_in"), "needs a scaling factor"),
    (lambda f: _edit_cfg(f, architecture="jumprelu"), "has no tensor 'threshold'"),
    (lambda f: _edit_cfg(f, architecture="topk"), "a topk SAE needs k in 1..3"),
    (lambda f: (f / "sae_weights.safetensors").write_bytes(b"not safetensors"), "cannot read"),
])
def test_malformed_saelens_is_one_line(tmp_path, mutate, message):
    folder = save_saelens(tmp_path / "sae", W_enc=W_ENC, b_enc=B_ENC, W_dec=W_DEC, b_dec=B_DEC, hook_name="x")
    mutate(folder)
    with pytest.raises(UnitsError) as e:
        load_dictionary(folder)
    assert message in str(e.value) and "\n" not in str(e.value)


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps(cfg | changes))


@pytest.mark.parametrize("content, suffix, message", [
    (np.zeros((2, 3), dtype=np.float32), ".npy", "every direction must be finite and non-zero"),
    (np.zeros((2, 3, 4), dtype=np.float32), ".npy", "holds shape [2, 3, 4]; expected [n, d_model]"),
    (None, ".txt", "must be a .npy or .safetensors file"),
])
def test_bad_direction_files(tmp_path, content, suffix, message):
    f = tmp_path / f"d{suffix}"
    if content is None:
        f.write_text("1 2 3")
    else:
        np.save(f, content)
    with pytest.raises(UnitsError, match="units.path") as e:
        load_directions(f)
    assert message in str(e.value)


@pytest.mark.parametrize("units, message", [
    ({"kind": "sae"}, "units: units.path is needed for kind 'sae'"),
    ({"kind": "direction", "path": "d.npy"}, "units: units.hook is needed for kind 'direction'"),
    ({"path": "x"}, "units: units.path is only read for kind sae, transcoder or direction (kind is mlp_neuron)"),
    ({"kind": "neuron"}, "units.kind: 'neuron' is not allowed"),
    ({"kind": "sae", "path": "x", "format": "npz"}, "units.format: 'npz' is not allowed"),
])
def test_units_config_errors_are_one_line(units, message):
    from schemas.config import ConfigError, SweepConfig

    with pytest.raises(ConfigError) as e:
        SweepConfig.from_dict({"units": units})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert SweepConfig().units.kind == "mlp_neuron"  # the default keeps sweeping MLP neurons
    cfg = SweepConfig.load(None, {"units.kind": "sae", "units.path": "saes/l6"})
    assert (cfg.units.kind, cfg.units.path, cfg.units.format) == ("sae", "saes/l6", "auto")
