import pytest

from orchestrator.plan import build_plan, config_diff, make_shards, prepare_run
from orchestrator.store import RunStore
from schemas.config import ConfigError, SweepConfig
from schemas.layout import (
    EXTRACT_MARKER,
    marker_shard_id,
    records_file,
    records_file_range,
    shard_file_name,
    shard_marker,
    shard_of_file,
    table_file,
)

SHAPE = {"name": "tiny-gpt2", "architecture": "gpt2", "n_layers": 2, "n_neurons": 64, "max_positions": 256}


def test_shards_cover_every_neuron_once_with_stable_ids():
    shards = make_shards([0, 3], list(range(10)), 4)
    assert [s.shard_id for s in shards] == ["L000-000000-000003", "L000-000004-000007", "L000-000008-000009",
                                            "L003-000000-000003", "L003-000004-000007", "L003-000008-000009"]
    want = [(layer, n) for layer in (0, 3) for n in range(10)]
    assert sorted((s.layer, n) for s in shards for n in s.neurons) == want
    assert make_shards([0, 3], list(range(10)), 4) == shards


def test_plan_checks_the_config_against_the_model():
    plan = build_plan(SweepConfig(layers="1", neurons="0-9", shard_size=4), SHAPE)
    assert plan.n_neurons == 10 and len(plan.shards) == 3
    with pytest.raises(ConfigError, match="layer 2 is out of range"):
        build_plan(SweepConfig(layers="2"), SHAPE)


def test_config_diff_ignores_runtime_knobs():
    a = SweepConfig().model_dump(mode="json")
    b = SweepConfig.from_dict({"metrics_port": 1, "explainer": {"concurrency": 99, "tokens_per_minute": 5},
                               "budget": {"max_tokens": 10}}).model_dump(mode="json")
    assert config_diff(a, b) == []
    c = SweepConfig.from_dict({"seed": 1, "corpus": {"seq_len": 32}}).model_dump(mode="json")
    assert config_diff(a, c) == ["corpus.seq_len", "seed"]


def test_a_run_directory_refuses_a_changed_config(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    cfg = SweepConfig(model={"name": "tiny-gpt2"}, layers="0", output=str(tmp_path / "run"))
    prepare_run(cfg, store)
    assert store.read_json("run.json")["plan"]["n_neurons"] == 64
    prepare_run(cfg.model_copy(update={"metrics_port": 0}), store)  # runtime knob: fine
    changed = SweepConfig(model={"name": "tiny-gpt2"}, layers="0", output=str(tmp_path / "run"), seed=5,
                          shard_size=7)
    with pytest.raises(ConfigError, match=r"changed: seed \(0 -> 5\), shard_size \(64 -> 7\)"):
        prepare_run(changed, store)


def test_a_sweep_refuses_layers_that_were_not_extracted(tmp_path):
    store = RunStore.open(str(tmp_path / "run"), create=True)
    store.write_json(EXTRACT_MARKER, {"model": "tiny-gpt2", "layers": [0]})
    with pytest.raises(ConfigError, match=r"layers: 1 not extracted in .* \(extracted: 0\)"):
        prepare_run(SweepConfig(model={"name": "tiny-gpt2"}, layers="0-1", output=str(tmp_path / "run")), store)
    prepare_run(SweepConfig(model={"name": "tiny-gpt2"}, layers="0", output=str(tmp_path / "run")), store)


def test_run_directory_names_and_their_inverses():
    shard = make_shards([3], list(range(64)), 64)[0]
    rel = table_file("ledger", shard_file_name(shard.shard_id), 3)
    assert rel == "ledger/layer=3/shard-L003-000000-000063.parquet"
    assert shard_of_file(rel) == shard.shard_id
    assert table_file("calls", shard_file_name("x")) == "calls/shard-x.parquet"
    with pytest.raises(ValueError, match="table scores is partitioned by layer"):
        table_file("scores", "shard-x")
    assert records_file(64, 128) == "n000064-000128"
    assert records_file_range(f"records/layer=0/{records_file(64, 128)}.parquet") == (64, 128)
    assert marker_shard_id(shard_marker(shard.shard_id)) == shard.shard_id
    assert marker_shard_id("_markers/_tmp-1f2e") is None


def test_a_run_json_from_before_a_field_existed_resumes_with_that_fields_default(tmp_path):
    # run.json written by an older version lacks fields added since (here units and records.bottom_k): the run
    # used their defaults, so resuming with the defaults is no change; a real change is still refused
    store = RunStore.open(str(tmp_path / "run"), create=True)
    cfg = SweepConfig(model={"name": "tiny-gpt2"}, layers="0", output=str(tmp_path / "run"))
    prepare_run(cfg, store)
    run = store.read_json("run.json")
    del run["config"]["units"]
    del run["config"]["records"]["bottom_k"]
    store.write_json("run.json", run)
    prepare_run(cfg, store)
    with pytest.raises(ConfigError, match=r"changed: records\.bottom_k"):
        prepare_run(cfg.model_copy(update={"records": cfg.records.model_copy(update={"bottom_k": 3})}), store)
