"""The unit source a run records (kind, path, format, width, hooks, the weights' sha256), where it is read back
from, the labels the commands print with it, and the refusal to continue a run with another dictionary."""
from __future__ import annotations

import hashlib
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.extraction.plan import checked_plan
from orchestrator.store import RunStore
from orchestrator.units import MLP_NEURON, recorded_source, source_of, unit_label, units_line
from schemas.config import SweepConfig, Units
from schemas.tables import UNITS_KEY, to_table, units_of
from testing.models import tiny_model
from workers.units import UnitsError
from workers.units.dictionaries import save_saelens
from workers.units.source import check_same_source, load_units

SAE = {"kind": "sae", "path": "runs/x-sae", "format": "saelens", "n_units": 2048, "activation": "topk", "k": 32,
       "hooks": {"3": "blocks.3.hook_resid_post"}, "sha256": "3f2a9c" + "0" * 58}


def test_labels_name_the_kind_the_hook_and_the_dictionary():
    assert unit_label(SAE, 3, 123) == "SAE latent 123 of layer 3 (blocks.3.hook_resid_post, runs/x-sae)"
    assert unit_label(MLP_NEURON, 3, 5) == "MLP neuron 5 of layer 3"
    assert unit_label(None, 0, 1) == "MLP neuron 1 of layer 0"  # nothing recorded yet: neurons, the default
    assert unit_label({"kind": "transcoder", "path": "tc"}, 2, 7) == "transcoder latent 7 of layer 2 (tc)"
    assert units_line(SAE) == ("SAE latents: 2,048 per layer of runs/x-sae (saelens, topk k=32) at "
                               "blocks.3.hook_resid_post; sha256 3f2a9c000000")
    assert units_line(MLP_NEURON) == units_line(None) == "MLP neurons"


def test_the_source_is_read_from_run_json_then_the_marker_then_the_extraction_plan():
    mlp_run = {"config": {"units": {"kind": "mlp_neuron"}}, "model": {"name": "m"}}
    assert source_of({"config": {"units": {"kind": "sae"}}, "model": {"units": SAE}}, None, None) == SAE
    assert source_of(mlp_run, {"units": SAE}) == MLP_NEURON
    assert source_of({"config": {}}, None) == MLP_NEURON  # a run.json from before `units` existed
    assert source_of(None, {"units": SAE}) == SAE  # an extraction (or a Neuronpedia import) on its own
    assert source_of(None, {"model": {"name": "imported"}}) == MLP_NEURON  # an import that names no units
    assert source_of(None, None, {"units": {"kind": "sae"}, "unit_source": SAE}) == SAE
    assert source_of(None, None, {"units": None}) == MLP_NEURON
    assert source_of(None, None, None) is None


def test_every_table_file_names_the_unit_source_once_the_run_records_it(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    rel = store.write_table("calls", to_table("calls", []), "before")
    assert UNITS_KEY not in pq.read_schema(store.path(rel)).metadata  # nothing recorded yet: no claim
    store.write_json("run.json", {"config": {"units": {"kind": "sae"}}, "model": {"units": SAE}})
    for table, layer in (("ledger", 3), ("sequences", None), ("records", 3)):
        rel = store.write_table(table, to_table(table, []), "after", layer=layer)
        assert units_of(pq.read_schema(store.path(rel))) == SAE, table
    mlp = RunStore.open(str(tmp_path / "mlp"), create=True)
    mlp.write_json("run.json", {"config": {"units": {"kind": "mlp_neuron"}}, "model": {}})
    rel = mlp.write_table("ledger", to_table("ledger", []), "x", layer=0)
    assert units_of(pq.read_schema(mlp.path(rel))) == {"kind": "mlp_neuron"} == recorded_source(mlp)


def test_the_source_records_the_weights_sha256_and_a_changed_file_is_refused_in_one_line(tmp_path):
    tiny = tiny_model("llama")
    d = tiny.model.config.hidden_size
    torch.manual_seed(0)
    save_saelens(tmp_path / "sae", W_enc=torch.randn(d, 8), b_enc=torch.zeros(8), W_dec=torch.randn(8, d),
                 b_dec=torch.zeros(d), hook_name="blocks.1.hook_resid_post", architecture="topk", k=2)
    units = Units(kind="sae", path=str(tmp_path / "sae"))
    first = load_units(units, tiny.model, weights=False).source()
    weights = (tmp_path / "sae" / "sae_weights.safetensors").read_bytes()
    assert first == {"kind": "sae", "path": str(tmp_path / "sae"), "format": "saelens", "n_units": 8,
                     "activation": "topk", "k": 2, "hooks": {"1": "blocks.1.hook_resid_post"},
                     "sha256": hashlib.sha256(weights).hexdigest()}
    check_same_source(first, dict(first), "runs/a")  # the same file: fine
    check_same_source({k: v for k, v in first.items() if k != "sha256"}, first, "runs/a")  # recorded before
    check_same_source(None, first, "runs/a")
    save_saelens(tmp_path / "sae", W_enc=torch.randn(d, 8), b_enc=torch.zeros(8), W_dec=torch.randn(8, d),
                 b_dec=torch.zeros(d), hook_name="blocks.1.hook_resid_post", architecture="topk", k=2)
    second = load_units(units, tiny.model, weights=False).source()
    assert second["sha256"] == hashlib.sha256((tmp_path / "sae" / "sae_weights.safetensors").read_bytes()).hexdigest()
    with pytest.raises(UnitsError) as e:
        check_same_source(first, second, "runs/a")
    assert str(e.value) == (f"units: runs/a was started with another dictionary than the one at {tmp_path / 'sae'} "
                            f"now (sha256 {first['sha256'][:12]!r} -> {second['sha256'][:12]!r}); put the original "
                            f"back or use a new --out directory")


def test_a_partial_extraction_is_not_continued_with_another_dictionary(tmp_path):
    cfg = SweepConfig.from_dict({"units": {"kind": "sae", "path": "runs/x-sae"}, "output": str(tmp_path / "run")})
    store = RunStore.open(cfg.output, create=True)
    info = SimpleNamespace(name="m", architecture="llama", n_neurons=2048)
    assert checked_plan(cfg, store, info, [3], 8, SAE)["unit_source"] == SAE
    assert checked_plan(cfg, store, info, [3], 8, dict(SAE))["unit_source"] == SAE  # the same: continued
    with pytest.raises(UnitsError, match=r"another dictionary .* \(sha256 '3f2a9c000000' -> 'ffffffffffff'\)"):
        checked_plan(cfg, store, info, [3], 8, {**SAE, "sha256": "f" * 64})
