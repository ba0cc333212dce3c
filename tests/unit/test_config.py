import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st

from orchestrator.cli.app import build_config
from orchestrator.plan import build_plan
from schemas.config import ConfigError, SweepConfig, expand_ranges, parse_ranges
from workers.method import check_config


def test_defaults_run_offline():
    cfg = SweepConfig()
    assert cfg.model.name == "smollm2-135m"
    assert cfg.explainer.kind == "local" and cfg.simulator.kind == "local"
    assert cfg.corpus.source == "pydoc"
    assert (cfg.records.top_k, cfg.records.n_random, cfg.records.n_per_split) == (20, 15, 5)


def test_yaml_file_and_overrides(tmp_path):
    f = tmp_path / "sweep.yaml"
    f.write_text("layers: 0,3-5\ncorpus:\n  seq_len: 32\nexplainer:\n  kind: openai\n  model: gpt-4o-mini\n")
    cfg = SweepConfig.load(f, {"corpus.seq_len": 16, "seed": 7})
    assert cfg.layers == "0,3-5" and cfg.corpus.seq_len == 16 and cfg.seed == 7
    assert cfg.explainer.model == "gpt-4o-mini"
    assert cfg.layer_list(30) == [0, 3, 4, 5]
    assert SweepConfig.from_dict(cfg.model_dump(mode="json")) == cfg  # round-trips


@pytest.mark.parametrize("data, field", [
    ({"corpus": {"seq_lenn": 3}}, "corpus.seq_lenn: unknown key"),
    ({"bogus": 1}, "bogus: unknown key"),
    ({"shard_size": "many"}, "shard_size"),
    ({"explainer": {"kind": "anthropic"}}, "explainer.kind: 'anthropic' is not allowed ('local' or 'openai')"),
    ({"records": {"top_k": 10}}, "records.top_k=10 must be at least 4 x records.n_per_split = 20"),
    ({"records": {"n_random": 5}}, "records.n_random=5 must be 0 or at least 3 x"),
    ({"layers": "3-1"}, "layers: range '3-1' runs backwards"),
    ({"neurons": "first ten"}, "neurons: 'first ten' is not 'all'"),
    ({"scorers": []}, "scorers: at least one scorer"),
    ({"simulator": {"base_url": "localhost:8000"}}, "simulator.base_url: must start with http"),
    ({"metrics_port": 70000}, "metrics_port"),
])
def test_bad_configs_name_the_field(data, field):
    with pytest.raises(ConfigError) as e:
        SweepConfig.from_dict(data)
    assert field in str(e.value)
    assert "\n" not in str(e.value)


def test_unknown_key_lists_allowed_keys():
    with pytest.raises(ConfigError, match=r"allowed here: source, format, text_field"):
        SweepConfig.from_dict({"corpus": {"sauce": "x"}})


def test_checks_against_the_model():
    with pytest.raises(ConfigError,
                       match=r"layers: layer 99 is out of range; this model has 30 layers \(allowed: 0..29\)"):
        SweepConfig(layers="99").check_against_model(30, 1536, 8192)
    with pytest.raises(ConfigError, match=r"neurons: neuron 1536 is out of range.*allowed: 0..1535"):
        SweepConfig(neurons="1500-1536").check_against_model(30, 1536, 8192)
    with pytest.raises(ConfigError, match=r"corpus.seq_len=512 is longer than the model's context of 256"):
        SweepConfig.from_dict({"corpus": {"seq_len": 512}}).check_against_model(2, 64, 256)
    SweepConfig(layers="0,29", neurons="0-1535").check_against_model(30, 1536, 8192)


def test_bad_yaml_file(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("layers: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        SweepConfig.load(f)
    with pytest.raises(ConfigError, match="cannot read config file"):
        SweepConfig.load(tmp_path / "missing.yaml")


@given(st.lists(st.tuples(st.integers(0, 50), st.integers(0, 10)), min_size=1, max_size=6))
def test_ranges_expand_to_the_union(pairs):
    spec = ",".join(f"{lo}-{lo + d}" for lo, d in pairs)
    want = sorted({i for lo, d in pairs for i in range(lo, lo + d + 1)})
    assert expand_ranges(spec, 100, "layers", "layer") == want
    assert parse_ranges("all") is None


@pytest.mark.parametrize("data, message", [
    ({"scorers": ["correlation", "vibes"]},
     "scorers: 'vibes' is not a scorer (allowed: correlation, detection, fuzzing, embedding)"),
    ({"simulator": {"mode": "psychic"}},
     "simulator.mode: 'psychic' is not a simulator mode "
     "(allowed: auto, prompt_logprob, generated_logprob, logprob_free)"),
])
def test_method_names_are_checked_against_the_registries_before_any_work(tmp_path, data, message):
    cfg = SweepConfig.from_dict(data)  # schemas/ does not import the registries: the workers' check does
    f = tmp_path / "sweep.yaml"
    f.write_text(yaml.safe_dump(data))
    shape = {"n_layers": 2, "n_neurons": 64, "max_positions": 256}
    for where in (lambda: check_config(cfg), lambda: build_plan(cfg, shape), lambda: build_config(f)):
        with pytest.raises(ConfigError) as e:
            where()
        assert str(e.value) == message


def test_registered_names_pass_and_repeats_collapse():
    cfg = SweepConfig.from_dict({"scorers": ["detection", "correlation", "detection"],
                                 "simulator": {"mode": "logprob_free"}})
    check_config(cfg)
    assert cfg.scorers == ["detection", "correlation"]
    check_config(SweepConfig())


def test_a_bare_yaml_off_turns_the_negative_side_off():
    """YAML reads `off` as false, in a file and in `--set records.negative=off`."""
    assert SweepConfig.from_dict(yaml.safe_load("records: {negative: off}")).records.negative == "off"
    with pytest.raises(ValueError, match="records.negative"):
        SweepConfig.from_dict(yaml.safe_load("records: {negative: true}"))
