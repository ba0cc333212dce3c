"""The extraction stage against a run directory: outputs, resume after SIGKILL, Ray actors, CLI, bad input."""
import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from orchestrator.extraction import run_extraction
from orchestrator.extraction.outputs import read_records
from orchestrator.extraction.plan import bottom_k_for, checked_plan
from orchestrator.plan import Shard
from orchestrator.shards import StoreRecordSource
from orchestrator.store import RunStore
from schemas.config import ConfigError, SweepConfig
from schemas.layout import EXTRACT_MARKER, EXTRACT_PLAN
from testing.stubs import RuleStubBackend
from workers.extract import capture
from workers.extract.checkpoint import slot_heads
from workers.extract.corpus import CorpusError
from workers.extract.errors import ExtractError
from workers.extract.sketch import classifier_picks_py, sketch_picks_py
from workers.extract.worker import ExtractWorker
from workers.method.neuron import explain_and_score

ROOT = Path(__file__).resolve().parents[2]


def config(out, **over):
    data = {"model": {"name": "tiny-gpt2", "batch_size": 5}, "corpus": {"seq_len": 16, "max_windows": 40},
            "records": {"top_k": 4, "n_random": 3, "n_per_split": 1, "quantiles": True, "n_per_quantile": 1},
            "seed": 3, "output": str(out)}
    for k, v in over.items():
        data.setdefault(k, {}).update(v) if isinstance(v, dict) else data.__setitem__(k, v)
    return SweepConfig.from_dict(data)


def tables(store):
    rec = store.read_table("records").sort_by([("layer", "ascending"), ("neuron", "ascending"),
                                               ("kind", "ascending"), ("rank", "ascending")])
    stats = store.read_table("neuron_stats").sort_by([("layer", "ascending"), ("neuron", "ascending")])
    return rec, stats


def assert_same_outputs(a, b):
    """Outputs of runs whose chunks ran in different processes. fp32 CPU kernels can round differently from one
    process to the next (up to ~1e-5 relative seen), which may reorder windows whose maxima tie exactly in one
    run (layer 0 of windows that start with the same token); so a different seq_id is accepted only between
    near-equal maxima, and, for quantile records, where such a rounding moved a window across a sketch bucket's
    boundary (rarely)."""
    (ra, sa), (rb, sb) = tables(a), tables(b)
    key = ["layer", "neuron", "kind", "rank"]
    assert ra.select(key).equals(rb.select(key))
    ma, mb = ra["max_activation"].to_numpy(), rb["max_activation"].to_numpy()
    same = ra["seq_id"].to_numpy() == rb["seq_id"].to_numpy()
    quantile = np.array(ra["kind"].to_pylist()) == "quantile"
    np.testing.assert_allclose(ma[~quantile | same], mb[~quantile | same], rtol=1e-4, atol=1e-5)
    assert (~quantile & ~same).sum() <= 0.02 * (~quantile).sum()  # ties are rare beyond layer 0's first token
    assert (quantile & ~same).sum() <= 0.02 * max(quantile.sum(), 1)
    acts_a, acts_b = np.array(ra["activations"].to_pylist()), np.array(rb["activations"].to_pylist())
    np.testing.assert_allclose(acts_a[same], acts_b[same], rtol=1e-4, atol=1e-5)
    for col in ("layer", "neuron", "n_tokens", "n_nonfinite", "frac_positive"):
        assert sa[col].equals(sb[col])
    for col in ("max", "min", "mean", "variance"):
        np.testing.assert_allclose(sa[col].to_numpy(), sb[col].to_numpy(), rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One uninterrupted in-process extraction that the other tests compare against."""
    out = tmp_path_factory.mktemp("ref")
    store = RunStore.open(str(out), create=True)
    summary = run_extraction(config(out), store, use_ray=False, chunk_windows=8)
    return store, summary


def test_outputs_equal_a_fresh_forward_over_the_stored_windows(reference, tiny_gpt2):
    store, summary = reference
    assert (summary.n_windows, summary.n_chunks, summary.chunks_processed) == (40, 5, 5)
    seqs = store.read_table("sequences")
    assert seqs["seq_id"].to_pylist() == list(range(40))  # stored once, in 5 part files
    assert len(store.list_files("sequences")) == 5
    token_ids = torch.tensor(seqs["token_ids"].to_pylist())
    acts = {}
    hooks = [tiny_gpt2.down_proj(layer).register_forward_pre_hook(
        lambda m, a, layer=layer: acts.__setitem__(layer, a[0].numpy().copy())) for layer in (0, 1)]
    with torch.no_grad():
        tiny_gpt2.model(token_ids)
    for h in hooks:
        h.remove()
    rec, stats = tables(store)
    for r in rec.to_pylist()[::7]:
        np.testing.assert_allclose(r["activations"], acts[r["layer"]][r["seq_id"], :, r["neuron"]], rtol=1e-5,
                                   atol=1e-6)
        assert r["max_activation"] == pytest.approx(max(r["activations"]))
    kinds = rec["kind"].to_pylist()
    assert kinds.count("top") == kinds.count("random") + 128 == 2 * 64 * 4 and "bottom" not in kinds  # GELU: none
    quantile = rec.filter(pc.field("kind") == "quantile")
    per_neuron = pc.value_counts(pc.add(pc.multiply(quantile["layer"].cast("int32"), 1000), quantile["neuron"]))
    assert len(per_neuron) == 128 and set(quantile["rank"].to_pylist()) <= {0, 1, 2}  # 40 windows: bin 3 is empty
    assert stats.num_rows == 128 and set(stats["n_tokens"].to_pylist()) == {40 * 16}
    assert set(stats["n_nonfinite"].to_pylist()) == {0}
    assert pc.all(pc.less_equal(stats["min"], stats["mean"])).as_py()
    # 40 windows: quantile 0.99 and 0.999 would be position 40, past the last window
    assert all(q[0] <= q[1] and q[2:] == [None, None] for q in stats["window_max_quantiles"].to_pylist())
    marker = store.read_json(EXTRACT_MARKER)
    assert {k: marker[k] for k in ("layers", "n_neurons", "n_windows", "seq_len", "top_k", "n_random", "seed")} == \
        {"layers": [0, 1], "n_neurons": 64, "n_windows": 40, "seq_len": 16, "top_k": 4, "n_random": 3, "seed": 3}
    assert marker["model"]["name"] == "tiny-gpt2"


def test_a_finished_run_is_not_redone(reference):
    store, _ = reference
    before = {p: os.path.getmtime(p) for p in store.list_files("records")}
    again = run_extraction(config(store.root), store, use_ray=False)
    assert again.already_complete and again.n_windows == 40
    assert {p: os.path.getmtime(p) for p in store.list_files("records")} == before


def test_reading_a_neuron_range_opens_only_its_files(tmp_path, monkeypatch):
    from orchestrator.extraction import outputs
    from orchestrator.metrics import SweepMetrics
    monkeypatch.setattr(outputs, "NEURONS_PER_FILE", 16)
    store = RunStore.open(str(tmp_path), create=True)
    metrics = SweepMetrics()
    run_extraction(config(tmp_path, layers="1", records={"quantiles": False}), store, use_ray=False, chunk_windows=40,
                   metrics=metrics)
    assert metrics.registry.get_sample_value("neuronsweep_extract_tokens_total") == 40 * 16
    assert metrics.registry.get_sample_value("neuronsweep_extract_tokens_per_second", {"actor": "0"}) > 0
    files = sorted(p.rsplit("/", 1)[-1] for p in store.list_files("records/layer=1"))
    assert files == ["n000000-000016.parquet", "n000016-000032.parquet", "n000032-000048.parquet",
                     "n000048-000064.parquet"]
    t = read_records(store, 1, 20, 30)
    assert sorted(set(t["neuron"].to_pylist())) == list(range(20, 30))
    assert t["neuron"].to_pylist() == sorted(t["neuron"].to_pylist())  # rows sorted by neuron
    assert t.num_rows == 10 * 7  # 4 top, 3 random
    assert read_records(store, 1, 70, 80).num_rows == 0
    assert pq.read_metadata(store.list_files("records/layer=1")[0]).num_rows == 16 * 7


def brute_force_and_stored(store, tiny_llama):
    """Both layers' activations of the 120 stored windows from plain forwards over the same batches (chunks of
    32 cut into batches of 7), and the stored records by (layer, neuron) and kind."""
    token_ids = torch.tensor(store.read_table("sequences")["token_ids"].to_pylist())
    acts = {0: [], 1: []}
    hooks = [tiny_llama.down_proj(layer).register_forward_pre_hook(
        lambda m, a, layer=layer: acts[layer].append(a[0].numpy().copy())) for layer in (0, 1)]
    with torch.no_grad():
        for lo in range(0, 120, 32):
            for i in range(lo, min(lo + 32, 120), 7):
                tiny_llama.model(token_ids[i:min(i + 7, lo + 32, 120)])
    for h in hooks:
        h.remove()
    got: dict = {}
    for r in store.read_table("records").to_pylist():
        got.setdefault((r["layer"], r["neuron"]), {}).setdefault(r["kind"], []).append(r)
    return acts, got


def test_quantile_and_bottom_records_equal_brute_force_and_the_quantile_pass_resumes(tmp_path, tiny_llama,
                                                                                     monkeypatch):
    """120 windows, chunks of 32 cut into batches of 7: every activation materialised over the same batches; the
    quantile picks computed the slow way (the sketch's bins, the hash picks) from the brute-force window maxima;
    the quantile pass's activations equal the first pass's bit for bit where a window is also a top, bottom or
    random record. A gated MLP gets bottom records by default (as many as top records)."""
    cfg = config(tmp_path, model={"name": "tiny-llama", "batch_size": 7}, corpus={"seq_len": 8, "max_windows": 120},
                 records={"n_per_quantile": 2})
    store = RunStore.open(str(tmp_path), create=True)
    run_extraction(cfg, store, use_ray=False, chunk_windows=32)
    acts, got = brute_force_and_stored(store, tiny_llama)
    n_picks = n_shared = 0
    for layer in (0, 1):
        full = np.concatenate(acts[layer])  # [120, 8, 64], brute force
        maxima, minima = full.max(axis=1), full.min(axis=1)
        for n in range(64):
            rows = got[(layer, n)]
            assert [r["seq_id"] for r in rows["bottom"]] == sorted(range(120), key=lambda s: (minima[s, n], s))[:4]
            want = sketch_picks_py(3, layer, n, list(range(120)), maxima[:, n].tolist(), 2)
            assert [(r["rank"], r["seq_id"]) for r in rows["quantile"]] == want
            n_picks += len(want)
            first_pass = {r["seq_id"]: r["activations"] for kind in ("top", "bottom", "random") for r in rows[kind]}
            for r in rows["quantile"]:
                np.testing.assert_allclose(r["activations"], full[r["seq_id"], :, n], rtol=1e-5, atol=1e-6)
                if r["seq_id"] in first_pass:
                    assert r["activations"] == first_pass[r["seq_id"]]  # bit for bit
                    n_shared += 1
    assert n_picks > 2 * 64 * 4 and n_shared > 20  # most bins of most neurons hold two windows
    # the quantile pass resumes by chunk: drop one chunk's output and the finished marks, run again
    before = tables(store)
    store.fs.delete_dir(store.path("_extract/quantile/chunk-00001"))
    store.fs.delete_file(store.path(EXTRACT_MARKER))
    redone = []
    original = ExtractWorker.process_quantiles
    monkeypatch.setattr(ExtractWorker, "process_quantiles", lambda self, c: redone.append(c) or original(self, c))
    again = run_extraction(cfg, store, use_ray=False)
    assert again.chunks_processed == 0 and redone == [1]
    after = tables(store)
    assert before[0].equals(after[0]) and before[1].equals(after[1])


def test_classifier_windows_equal_the_slow_reference_beside_quantile_records(tmp_path, tiny_llama):
    """A scorer that labels classifier windows (detection) makes extraction pick them in the quantile pass: per
    neuron, the stratified and non-activating rows are what the slow reference picks from the brute-force window
    maxima and the neuron's max, with the brute-force activations; every non-activating window stays below the
    configured fraction of the max. Quantile records are picked as before beside them."""
    cfg = config(tmp_path, model={"name": "tiny-llama", "batch_size": 7}, corpus={"seq_len": 8, "max_windows": 120},
                 records={"n_per_quantile": 2}, scorers=["correlation", "detection"],
                 classifier={"bins": 4, "per_bin": 2, "n_non_activating": 5, "non_activating_below": 0.3})
    store = RunStore.open(str(tmp_path), create=True)
    run_extraction(cfg, store, use_ray=False, chunk_windows=32)
    acts, got = brute_force_and_stored(store, tiny_llama)
    n_low = 0
    for layer in (0, 1):
        full = np.concatenate(acts[layer])  # [120, 8, 64]
        maxima = full.max(axis=1)
        for n in range(64):
            rows = got[(layer, n)]
            top = float(maxima[:, n].max())
            want = classifier_picks_py(3, layer, n, list(range(120)), maxima[:, n].tolist(), top, 4, 2, 5, 0.3)
            picked = [(r["rank"], r["seq_id"]) for r in sorted(rows.get("stratified", []), key=lambda r: r["rank"])]
            picked += [(8 + r["rank"], r["seq_id"]) for r in sorted(rows.get("non_activating", []),
                                                                     key=lambda r: r["rank"])]
            assert picked == want, (layer, n)
            for r in rows.get("stratified", []) + rows.get("non_activating", []):
                np.testing.assert_allclose(r["activations"], full[r["seq_id"], :, n], rtol=1e-5, atol=1e-6)
            assert all(r["max_activation"] < 0.3 * top for r in rows.get("non_activating", []))
            n_low += len(rows.get("non_activating", []))
            assert [(r["rank"], r["seq_id"]) for r in rows["quantile"]] == \
                sketch_picks_py(3, layer, n, list(range(120)), maxima[:, n].tolist(), 2)
    assert n_low > 64  # most neurons have quiet windows
    assert store.read_json(EXTRACT_MARKER)["classifier"] == {
        "classifier_bins": 4, "classifier_per_bin": 2, "n_non_activating": 5, "non_activating_below": 0.3}
    # a shard reads them back as the neuron's classifier windows, and detection scores on them
    records = StoreRecordSource(store).load(Shard(1, (0, 1)))[0]
    assert [r.seq_id for r in records.stratified] == [r["seq_id"] for r in got[(1, 0)]["stratified"]]
    assert [r.seq_id for r in records.non_activating] == [r["seq_id"] for r in got[(1, 0)].get("non_activating", [])]
    res = asyncio.run(explain_and_score(records, RuleStubBackend(), RuleStubBackend(), cfg))
    detection = next(r for r in res.score_rows if r["scorer"] == "detection")
    assert json.loads(detection["settings"])["protocol"] == "stratified"


KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {root!r})
    from orchestrator.extraction import run_extraction
    from orchestrator.store import RunStore
    from schemas.config import SweepConfig
    cfg = SweepConfig.from_dict({cfg!r})
    def progress(p):
        if p.chunks_done == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # the driver dies hard after two finished chunks
    run_extraction(cfg, RunStore.open(cfg.output, create=True), use_ray=False, chunk_windows=8, progress=progress)
""")


def test_killed_driver_resumes_from_the_last_finished_chunk(tmp_path, reference):
    cfg = config(tmp_path / "run")
    script = KILLER.format(root=str(ROOT), cfg=cfg.model_dump(mode="json"))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()[-2000:]
    store = RunStore.open(cfg.output)
    assert not store.exists(EXTRACT_MARKER)
    resumed = run_extraction(cfg, store, use_ray=False, chunk_windows=8)
    assert (resumed.chunks_resumed, resumed.chunks_processed) == (2, 3)  # chunks 0 and 1 were not recomputed
    assert_same_outputs(store, reference[0])


def test_a_partial_run_with_other_settings_is_refused(tmp_path):
    store = RunStore.open(str(tmp_path), create=True)
    checked_plan(config(tmp_path), store, _info(), [0, 1], 8)
    with pytest.raises(ExtractError, match=r"other settings \(top_k: 4 there, 8 now\)"):
        checked_plan(config(tmp_path, records={"top_k": 8, "n_per_split": 1}), store, _info(), [0, 1], 8)


def test_a_partial_run_without_quantiles_is_not_continued_with_them(tmp_path):
    """Its finished chunks saved no window maxima; a plan from before quantile records existed means 'off'."""
    store = RunStore.open(str(tmp_path), create=True)
    plan = checked_plan(config(tmp_path, records={"quantiles": False}), store, _info(), [0, 1], 8)
    store.write_json(EXTRACT_PLAN, {k: v for k, v in plan.items() if "quantile" not in k})
    assert checked_plan(config(tmp_path, records={"quantiles": False, "n_per_quantile": 5}), store,
                        _info(), [0, 1], 8)["layers"] == [0, 1]
    with pytest.raises(ExtractError, match=r"other settings \(quantiles, n_per_quantile: "
                                           r"False there, True now, 2 there, 1 now\)"):
        checked_plan(config(tmp_path), store, _info(), [0, 1], 8)


def test_a_partial_run_of_an_older_checkpoint_format_is_not_continued(tmp_path):
    """Its slots hold no bottom records, minima or quantile sketch."""
    store = RunStore.open(str(tmp_path), create=True)
    plan = checked_plan(config(tmp_path), store, _info(), [0, 1], 8)
    store.write_json(EXTRACT_PLAN, {k: v for k, v in plan.items() if k not in ("bottom_k", "state_format")})
    with pytest.raises(ExtractError, match=r"other settings \(state_format: 1 there, 2 now\)"):
        checked_plan(config(tmp_path), store, _info(), [0, 1], 8)


@pytest.mark.parametrize("architecture, bottom_k, want", [
    ("llama", None, 4), ("phi3", None, 4), ("gpt2", None, 0), ("opt", None, 0), ("gpt2", 8, 8), ("llama", 0, 0)])
def test_bottom_records_default_to_top_k_for_gated_mlps_only(tmp_path, architecture, bottom_k, want):
    records = {"bottom_k": bottom_k, "top_k": 4 if bottom_k != 8 else 8}
    assert bottom_k_for(config(tmp_path, records=records), architecture) == want


def _info():
    from workers.models.loading import model_info
    return model_info("tiny-gpt2")


@pytest.mark.parametrize("over, error, match", [
    ({"layers": "0,5"}, ConfigError, r"layers: layer 5 is out of range; this model has 2 layers"),
    ({"corpus": {"seq_len": 300}}, ConfigError, r"corpus.seq_len=300 is longer than the model's context of 256"),
])
def test_bad_input_is_a_clear_error(tmp_path, over, error, match):
    with pytest.raises(error, match=match):
        run_extraction(config(tmp_path, **over), RunStore.open(str(tmp_path), create=True), use_ray=False)


def test_an_empty_corpus_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(CorpusError, match="is empty"):
        run_extraction(config(tmp_path / "run", corpus={"source": str(empty)}),
                       RunStore.open(str(tmp_path / "run"), create=True), use_ray=False)


def test_cli_extract_then_again_does_nothing_and_other_settings_are_refused(tmp_path, capsys):
    from orchestrator.cli.app import main
    args = ["extract", "--model", "tiny-llama", "--layers", "1", "--max-windows", "12", "--seq-len", "8",
            "--out", str(tmp_path), "--local", "--set", "records.top_k=4", "--set", "records.n_random=3",
            "--set", "records.n_per_split=1"]
    assert main(args) == 0
    assert "extracted 1 layers x 64 neurons over 12 windows" in capsys.readouterr().out
    assert main(args) == 0
    assert "already complete" in capsys.readouterr().out
    # a finished extraction is not reused for other settings
    assert main([("12" if a == "8" else a) for a in args]) == 2
    assert ("holds a complete extraction with other settings (seq_len: 8 there, 12 now); use a new --out"
            in capsys.readouterr().err)
    assert main(["extract", "--model", "tiny-llama", "--layers", "7", "--out", str(tmp_path / "x"), "--local"]) == 2
    assert "layer 7 is out of range" in capsys.readouterr().err


def test_two_ray_actors_over_halves_equal_one_worker_over_all(tmp_path, reference, ray_local):
    cfg = config(tmp_path)
    store = RunStore.open(str(tmp_path), create=True)
    s = run_extraction(cfg, store, n_actors=2, chunk_windows=8)
    heads = slot_heads(store)
    assert sorted(heads) == [0, 1] and all(h["done_chunks"] for h in heads.values())  # both actors worked
    assert s.chunks_processed == 5
    assert_same_outputs(store, reference[0])


@pytest.mark.real_model
@pytest.mark.parametrize("compiled", [False, True])
def test_default_model_records_equal_a_fresh_forward(tmp_path, default_model, compiled, monkeypatch, caplog):
    """Eager, and compiled as real-sized runs are, computing each batch of 4 in slices of 3 and 1 windows
    (`slice_rows`; a whole corpus run on a CPU slices its batches the same way)."""
    cfg = SweepConfig.from_dict({"corpus": {"seq_len": 16, "max_windows": 12}, "layers": "0,29",
                                 "model": {"batch_size": 4}, "output": str(tmp_path)})
    store = RunStore.open(str(tmp_path), create=True)
    if compiled:
        item = next(default_model.model.parameters()).element_size()
        monkeypatch.setattr(capture, "CPU_SLICE_BYTES", 3 * 16 * 1536 * item)
    # batches of 4, like the check below
    run_extraction(cfg, store, use_ray=False, chunk_windows=4, compile=compiled)
    assert "running them eagerly" not in caplog.text
    seqs = store.read_table("sequences")
    token_ids = torch.tensor(seqs["token_ids"].to_pylist())
    acts = {}
    hooks = [default_model.down_proj(layer).register_forward_pre_hook(
        lambda m, a, layer=layer: acts.__setitem__(layer, a[0].float().numpy().copy())) for layer in (0, 29)]
    with torch.no_grad():
        for i in range(0, 12, 4):  # same batches as the extraction: bf16 kernels are exact per batch shape
            default_model.model(input_ids=token_ids[i:i + 4], use_cache=False)
            for layer in (0, 29):
                acts.setdefault(("all", layer), []).append(acts[layer])
    for h in hooks:
        h.remove()
    full = {layer: np.concatenate(acts[("all", layer)]) for layer in (0, 29)}
    rec = store.read_table("records")
    # 12 windows: fewer than top_k, bottom_k (a gated MLP: as many as top_k) and n_random
    assert set(rec["layer"].to_pylist()) == {0, 29} and rec.num_rows == 2 * 1536 * (12 + 12 + 12)
    for r in rec.to_pylist()[::97]:
        assert r["activations"] == full[r["layer"]][r["seq_id"], :, r["neuron"]].tolist()  # bf16, bit for bit
