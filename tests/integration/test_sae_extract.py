"""SAE latents extracted inside the one forward pass, end to end through `run_extraction`: dictionaries built
here (planted latents that fire on known tokens, a dead latent, random ones), saved in the SAELens and the
sparsify layouts, give records and statistics equal to a brute-force encode of a plain forward pass."""
from __future__ import annotations

import pytest
import torch

from orchestrator.extraction import run_extraction
from orchestrator.plan import build_plan, model_shape
from orchestrator.store import RunStore
from schemas.config import ConfigError, SweepConfig
from support import planted_sae
from testing.models import tiny_model
from workers.units.dictionaries import load_dictionary, save_saelens, save_sparsify

D_SAE, DEAD, N_WINDOWS, SEQ_LEN, BATCH = 24, 3, 96, 16, 32


@pytest.fixture(scope="module")
def tiny():
    return tiny_model("llama")


@pytest.fixture(scope="module")
def windows(tiny):
    from workers.extract.corpus import iter_windows

    cfg = SweepConfig.from_dict({"corpus": {"seq_len": SEQ_LEN, "max_windows": N_WINDOWS}})
    return torch.tensor([w.token_ids for w in iter_windows(cfg.corpus, tiny.tokenizer)])


def planted_encoder(tiny, windows):
    """Latents 0..2 fire exactly where the input embedding is their token's, latent DEAD never fires."""
    return planted_sae.planted_encoder(tiny, windows, D_SAE, DEAD)


def brute_force(tiny, windows, hidden_index, d):
    """Latents [W, T, D] from a plain forward pass (output_hidden_states), batch by batch as extraction runs."""
    out = []
    with torch.no_grad():
        for i in range(0, len(windows), BATCH):
            hs = tiny.model(input_ids=windows[i:i + BATCH], output_hidden_states=True).hidden_states
            z = d.encode(hs[hidden_index])
            z[:, 0] = 0  # the first position of a window is dropped (docs/design.md, "Units")
            out.append(z)
    return torch.cat(out)


def extract(tmp_path, units: dict, **extra):
    cfg = SweepConfig.from_dict({"model": {"name": "tiny-llama", "batch_size": BATCH},
                                 "corpus": {"seq_len": SEQ_LEN, "max_windows": N_WINDOWS},
                                 "units": units, "output": str(tmp_path / "run"), **extra})
    store = RunStore.open(cfg.output, create=True)
    return cfg, store, run_extraction(cfg, store, use_ray=False, compile=False)


def check_against_brute_force(store, layer, z):
    records = store.read_table("records").to_pylist()
    top_k = max(r["rank"] for r in records if r["kind"] == "top") + 1
    wmax = z.amax(1)  # [W, D]
    for unit in range(D_SAE):
        rows = sorted((r for r in records if r["neuron"] == unit), key=lambda r: (r["kind"], r["rank"]))
        top = [r for r in rows if r["kind"] == "top"]
        order = sorted(range(len(wmax)), key=lambda s: (-float(wmax[s, unit]), s))[:top_k]
        assert [r["seq_id"] for r in top] == order, unit
        for r in rows:
            assert r["layer"] == layer
            assert torch.equal(torch.tensor(r["activations"]), z[r["seq_id"], :, unit]), (unit, r["kind"])
    stats = {r["neuron"]: r for r in store.read_table("neuron_stats").to_pylist()}
    for unit in range(D_SAE):
        assert stats[unit]["max"] == pytest.approx(float(z[..., unit].max()), abs=1e-7)
        assert stats[unit]["frac_positive"] == pytest.approx(float((z[..., unit] > 0).double().mean()))


def test_saelens_sae_at_resid_pre_matches_brute_force_and_fires_on_planted_tokens(tmp_path, tiny, windows):
    w, b, planted = planted_encoder(tiny, windows)
    save_saelens(tmp_path / "sae", W_enc=w, b_enc=b, W_dec=w.T, b_dec=torch.zeros(32),
                 hook_name="blocks.0.hook_resid_pre")
    cfg, store, summary = extract(tmp_path, {"kind": "sae", "path": str(tmp_path / "sae")})
    assert (summary.layers, summary.n_neurons) == ([0], D_SAE)
    marker = store.read_json("_extract/complete.json")
    assert marker["units"]["kind"] == "sae" and marker["units"]["hooks"] == {"0": "blocks.0.hook_resid_pre"}
    assert marker["model"]["n_neurons"] == 64  # the model's own MLP width stays recorded
    z = brute_force(tiny, windows, 0, load_dictionary(tmp_path / "sae"))
    check_against_brute_force(store, 0, z)
    # planted latents fire exactly on their token (after position 0), the dead one nowhere
    for j, tok in enumerate(planted):
        fires = z[:, 1:, j] > 0
        assert torch.equal(fires, windows[:, 1:] == tok) and bool(fires.any())
    assert not bool((z[..., DEAD] != 0).any())
    top_dead = [r for r in store.read_table("records").to_pylist() if r["neuron"] == DEAD and r["kind"] == "top"]
    assert max(r["max_activation"] for r in top_dead) == 0  # so the sweep skips it as dead
    # the sweep plans this run's units: the dictionary's layer and width, source in run.json's model
    shape = model_shape(cfg, store)
    plan = build_plan(cfg, shape)
    assert {s.layer for s in plan.shards} == {0} and plan.n_neurons == D_SAE
    assert shape["units"]["path"] == str(tmp_path / "sae")


def test_sparsify_topk_at_a_layer_output_matches_brute_force(tmp_path, tiny, windows):
    torch.manual_seed(2)
    enc, bias, b_dec = torch.randn(D_SAE, 32), torch.randn(D_SAE) * 0.1, torch.randn(32) * 0.1
    save_sparsify(tmp_path / "sparsify", "layers.0", encoder_weight=enc, encoder_bias=bias, W_dec=enc,
                  b_dec=b_dec, k=4)
    save_sparsify(tmp_path / "sparsify", "layers.1", encoder_weight=enc, encoder_bias=bias, W_dec=enc,
                  b_dec=b_dec, k=4)
    # two hook points in the folder: units.hook picks layer 0's (sparsify names folders by hook point)
    _, store, summary = extract(tmp_path, {"kind": "sae", "path": str(tmp_path / "sparsify"), "hook": "layers.0"})
    assert summary.layers == [0]
    z = brute_force(tiny, windows, 1, load_dictionary(tmp_path / "sparsify" / "layers.0"))
    assert bool(((z > 0).sum(-1) <= 4).all())
    check_against_brute_force(store, 0, z)


@pytest.mark.parametrize("units, architecture, message", [
    ({"kind": "sae", "hook": "blocks.0.hook_resid_post"}, "standard",
     "reads 16-wide activations, but blocks.0.hook_resid_post carries 32 in this model"),
    ({"kind": "sae", "hook": "blocks.9.hook_resid_post"}, "standard",
     "layer 9 is out of range; this model has 2 layers"),
    ({"kind": "sae"}, "transcoder", "units.kind is 'sae' but"),
])
def test_wrong_width_or_hook_is_one_line_before_any_work(tmp_path, units, architecture, message):
    save_saelens(tmp_path / "narrow", W_enc=torch.zeros(16, 4), b_enc=torch.zeros(4), W_dec=torch.zeros(4, 16),
                 b_dec=torch.zeros(16), hook_name="blocks.0.hook_resid_pre", architecture=architecture)
    with pytest.raises(ConfigError) as e:
        extract(tmp_path, {**units, "path": str(tmp_path / "narrow")})
    assert message in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "run" / "sequences").exists()  # no work was done
