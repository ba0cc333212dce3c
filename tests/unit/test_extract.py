"""The activation collector against brute force: every activation materialised, top/bottom/random/stats the slow
way; non-finite activations; the quantile sketch against its slow reference and the exact quantiles."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.config import Corpus
from workers.extract import capture
from workers.extract.checkpoint import tensor_bytes, tensor_load
from workers.extract.collectors import ActivationCollector, CollectorSpec, LayerCapture, TopReservoir
from workers.extract.corpus import iter_windows
from workers.extract.errors import ExtractError
from workers.extract.forward import ActivationExtractor
from workers.extract.keys import (
    float_order_key,
    neuron_salts,
    quantile_bin_bounds,
    quantile_picks,
    quantile_picks_py,
    quantile_priority_py,
    random_priorities,
    random_priority_py,
    random_sample,
    random_sample_py,
)
from workers.extract.sketch import (
    MIN_EXP,
    N_BUCKETS,
    RELATIVE_WIDTH,
    ZERO,
    QuantileSketch,
    bins_of_buckets,
    bucket_bounds,
    bucket_of,
    bucket_of_py,
    sketch_picks_py,
)
from workers.extract.worker import wants_compile

SEED = 7


def windows_of(model, n=45, seq_len=16):
    ws = list(iter_windows(Corpus(seq_len=seq_len, max_windows=n), model.tokenizer))
    return torch.tensor([w.token_ids for w in ws]), torch.tensor([w.seq_id for w in ws])


def all_activations(model, layers, token_ids, batch_size):
    """The oracle's input: the model's own forward, batch by batch as the extractor cuts them (other matrix
    shapes round differently), with a hook that keeps every activation."""
    seen = {layer: [] for layer in layers}
    hooks = [model.down_proj(layer).register_forward_pre_hook(
        lambda mod, args, layer=layer: seen[layer].append(args[0].float().numpy().copy())) for layer in layers]
    with torch.no_grad():
        for i in range(0, len(token_ids), batch_size):
            model.model(token_ids[i:i + batch_size])
    for h in hooks:
        h.remove()
    return {layer: np.concatenate(parts) for layer, parts in seen.items()}


def slow_summary(acts, seq_ids, layer, top_k, n_random, bottom_k=0, seed=SEED):
    """acts [W, T, N] -> per neuron: top, bottom and random (seq_ids), stats - straight from the definitions,
    including docs/method.md §2's rule for non-finite activations: a window holding one ranks after every
    all-finite window (its max counts as -inf), and the statistics are over the finite activations."""
    out = []
    for n in range(acts.shape[2]):
        a = acts[:, :, n]
        fin = np.isfinite(a)
        dirty = ~fin.all(1)
        wmax = np.where(dirty, -np.inf, np.where(fin, a, -np.inf).max(1))
        wmin = np.where(dirty, np.inf, np.where(fin, a, np.inf).min(1))
        top = sorted(range(len(seq_ids)), key=lambda i: (-wmax[i], seq_ids[i]))[:top_k]
        bottom = sorted(range(len(seq_ids)), key=lambda i: (wmin[i], seq_ids[i]))[:bottom_k]
        pos = {int(s): i for i, s in enumerate(seq_ids)}
        rnd = [pos[s] for s in random_sample_py(seed, layer, n, [int(s) for s in seq_ids], n_random)]
        flat = a[fin].astype(np.float64)
        out.append({"top": [int(seq_ids[i]) for i in top], "random": [int(seq_ids[i]) for i in rnd],
                    "bottom": [int(seq_ids[i]) for i in bottom], "bottom_acts": a[bottom],
                    "top_acts": a[top], "random_acts": a[rnd], "mean": flat.mean(), "variance": flat.var(),
                    "max": flat.max(), "min": flat.min(), "frac_positive": (flat > 0).mean(), "n_tokens": a.size,
                    "n_nonfinite": int((~fin).sum())})
    return out


def by_neuron(records):
    rows = {}
    for r in records.to_pylist():
        rows.setdefault(r["neuron"], {}).setdefault(r["kind"], []).append(r)
    return rows


def check_against_oracle(collector, layer, acts, seq_ids, top_k, n_random, bottom_k=0):
    want = slow_summary(acts, seq_ids.numpy(), layer, top_k, n_random, bottom_k)
    got = by_neuron(collector.layers[layer].records_table())
    stats = collector.layers[layer].stats_table().to_pylist()
    for n, w in enumerate(want):
        top, rnd, bottom = got[n]["top"], got[n].get("random", []), got[n].get("bottom", [])
        assert [r["seq_id"] for r in top] == w["top"], f"neuron {n}"
        assert [r["rank"] for r in top] == list(range(len(w["top"])))
        assert [r["seq_id"] for r in bottom] == w["bottom"], f"neuron {n}"
        assert [r["rank"] for r in bottom] == list(range(len(w["bottom"])))
        assert [r["seq_id"] for r in rnd] == w["random"], f"neuron {n}"
        for rows, kind in ((top, "top"), (bottom, "bottom"), (rnd, "random")):
            np.testing.assert_allclose(np.array([r["activations"] for r in rows]).reshape(len(rows), acts.shape[1]),
                                       w[f"{kind}_acts"].reshape(len(rows), acts.shape[1]), rtol=1e-5, atol=1e-6)
        finite_max = np.where(np.isfinite(w["top_acts"]), w["top_acts"], -np.inf).max(1) if top else []
        np.testing.assert_allclose([r["max_activation"] for r in top], finite_max, rtol=1e-5, atol=1e-6)
        s = stats[n]
        assert s["neuron"] == n and s["n_tokens"] == w["n_tokens"] and s["n_nonfinite"] == w["n_nonfinite"]
        assert s["frac_positive"] == pytest.approx(w["frac_positive"], abs=1e-12)
        assert s["max"] == pytest.approx(w["max"], rel=1e-5, abs=1e-6)
        assert s["min"] == pytest.approx(w["min"], rel=1e-5, abs=1e-6)
        assert s["mean"] == pytest.approx(w["mean"], rel=1e-4, abs=1e-6)
        assert s["variance"] == pytest.approx(w["variance"], rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("path", ["fused", "hooked"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_collector_matches_brute_force_on_a_real_forward(fixture, path, request, monkeypatch):
    """Both ways of reading the neurons: the MLP forward with the reductions fused in, and the down
    projection's pre-hook (families without a known MLP shape)."""
    model = request.getfixturevalue(fixture)
    if path == "hooked":
        monkeypatch.setattr(model, "mlp_split", lambda layer: None)
    token_ids, seq_ids = windows_of(model)
    spec = CollectorSpec([0, 1], model.info.n_neurons, 16, top_k=6, n_random=5, seed=SEED, corpus=seq_ids.tolist(),
                         bottom_k=4)
    collector = ActivationCollector(spec)
    extractor = ActivationExtractor(model, collector)
    extractor.run(token_ids, seq_ids, batch_size=7)  # uneven batches: 6 x 7 + 3
    extractor.close()
    acts = all_activations(model, [0, 1], token_ids, batch_size=7)
    for layer in (0, 1):
        check_against_oracle(collector, layer, acts[layer], seq_ids, 6, 5, bottom_k=4)
    assert collector.n_windows == 45


def test_only_requested_layers_are_hooked_and_the_forward_stops_after_the_last(tiny_llama):
    token_ids, seq_ids = windows_of(tiny_llama, n=5)
    calls = []
    h = tiny_llama.down_proj(1).register_forward_pre_hook(lambda m, a: calls.append(1))
    collector = ActivationCollector(CollectorSpec([0], 64, 16, 3, 2, SEED, corpus=seq_ids.tolist()))
    extractor = ActivationExtractor(tiny_llama, collector)
    extractor.run(token_ids, seq_ids, batch_size=5)
    h.remove()
    extractor.close()
    assert list(collector.layers) == [0] and calls == []  # layer 1 never ran
    with torch.no_grad():  # and the hooks are gone after close, the model works as before
        tiny_llama.model(token_ids)


def test_the_fused_forward_leaves_the_model_as_it_was(tiny_llama):
    token_ids, seq_ids = windows_of(tiny_llama, n=5)
    mlp = tiny_llama.model.model.layers[0].mlp
    with torch.no_grad():
        want = tiny_llama.model(token_ids).logits
    spec = CollectorSpec([0, 1], 64, 16, 3, 2, SEED, corpus=seq_ids.tolist())
    outer = ActivationExtractor(tiny_llama, ActivationCollector(spec))
    patched = mlp.forward
    with torch.no_grad():  # a forward that is not the extractor's own runs the model unchanged
        assert torch.equal(tiny_llama.model(token_ids).logits, want)
    inner = ActivationExtractor(tiny_llama, LayerCapture([0], 64))  # as the quantile pass opens one
    inner.run_batch(token_ids, seq_ids)
    outer.run(token_ids, seq_ids, batch_size=5)  # the outer still records under the inner
    assert outer.collector.n_windows == 5 and inner.collector.acts[0].shape == (5, 16, 64)
    inner.close()
    assert mlp.forward == patched
    outer.close()
    assert "forward" not in vars(mlp)
    with torch.no_grad():
        assert torch.equal(tiny_llama.model(token_ids).logits, want)


@pytest.mark.parametrize("slice_windows", [None, 3])
def test_the_compiled_fused_path_records_what_the_eager_model_computes(tiny_llama, caplog, monkeypatch,
                                                                       slice_windows):
    """torch.compile fuses the neuron step with the reductions and emulates eager's bf16 roundings, so the
    records hold the model's own activations, bit for bit (and the summaries agree). With `slice_windows`,
    the capture computes each batch of 8 in slices of 3, 3 and 2 windows, as it does on a CPU for real-sized
    models (a tiny model's batch fits one slice)."""
    import copy

    from workers.models.loading import wrap
    if slice_windows:
        monkeypatch.setattr(capture, "CPU_SLICE_BYTES", slice_windows * 16 * 64 * 2)
        assert capture.slice_rows(torch.zeros(8, 16, 64, dtype=torch.bfloat16)) == slice_windows
    model = wrap(copy.deepcopy(tiny_llama.model).to(torch.bfloat16), tiny_llama.tokenizer, "tiny-llama-bf16")
    token_ids, seq_ids = windows_of(model, n=24)
    spec = CollectorSpec([0, 1], 64, 16, top_k=4, n_random=3, seed=SEED, corpus=seq_ids.tolist(), bottom_k=4,
                         n_per_quantile=2)
    tables = {}
    for compiled in (False, True):
        collector = ActivationCollector(spec, dtype=torch.bfloat16)
        extractor = ActivationExtractor(model, collector, compile=compiled)
        extractor.run(token_ids, seq_ids, batch_size=8)
        extractor.close()
        tables[compiled] = [(c.records_table(), c.stats_table()) for c in collector.layers.values()]
    assert "running them eagerly" not in caplog.text  # it did compile
    for (rec_eager, stats_eager), (rec_compiled, stats_compiled) in zip(tables[False], tables[True]):
        assert rec_compiled.equals(rec_eager)
        assert stats_compiled.column("window_max_quantiles").equals(stats_eager.column("window_max_quantiles"))
        for col in ("mean", "variance", "max", "min", "frac_positive"):
            np.testing.assert_allclose(stats_compiled.column(col).to_numpy(), stats_eager.column(col).to_numpy(),
                                       rtol=1e-6, atol=1e-9)


def synthetic(n_windows, seq_len, n_neurons, seed, levels=4, nonfinite=0.0):
    """Small integer activations: window maxima and minima tie all the time, which tests the tie rule.
    `nonfinite`: the fraction of activations replaced by NaN, +inf or -inf (as fp16 overflow leaves them)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-1, levels - 1, (n_windows, seq_len, n_neurons), generator=g).float()
    if nonfinite:
        hit = torch.rand(x.shape, generator=g) < nonfinite
        bad = torch.tensor([float("nan"), float("inf"), float("-inf")])[torch.randint(0, 3, x.shape, generator=g)]
        x = torch.where(hit, bad, x)
    return x


def feed(collector, layer, acts, seq_ids, batch):
    for i in range(0, len(seq_ids), batch):
        collector.update(layer, acts[i:i + batch], seq_ids[i:i + batch])
        collector.n_windows += len(seq_ids[i:i + batch])


def test_ties_go_to_the_lower_seq_id_whatever_the_arrival_order():
    spec = CollectorSpec([3], n_neurons=2, seq_len=2, top_k=3, n_random=0, seed=0)
    c = ActivationCollector(spec)
    acts = torch.tensor([[[1.0, 5.0], [0.0, 5.0]]] * 5)  # every window: neuron 0 max 1.0, neuron 1 max 5.0
    acts[2, 0, 0] = 2.0  # seq 40 is the one window above the tie for neuron 0
    seq_ids = torch.tensor([90, 10, 40, 30, 20])
    feed(c, 3, acts, seq_ids, batch=2)
    rows = by_neuron(c.layers[3].records_table())
    assert [r["seq_id"] for r in rows[0]["top"]] == [40, 10, 20]
    assert [r["seq_id"] for r in rows[1]["top"]] == [10, 20, 30]
    assert [r["max_activation"] for r in rows[0]["top"]] == [2.0, 1.0, 1.0]


def test_bottom_records_by_hand():
    """Bottom records: most negative window minimum first, ties to the lower seq_id, whatever the order."""
    spec = CollectorSpec([0], n_neurons=1, seq_len=2, top_k=1, n_random=0, seed=0, bottom_k=3)
    c = ActivationCollector(spec)
    acts = torch.tensor([[[-1.0], [4.0]], [[-3.0], [0.0]], [[2.0], [-1.0]], [[-3.0], [9.0]], [[0.5], [0.0]]])
    seq_ids = torch.tensor([50, 40, 30, 20, 10])  # minima -1, -3, -1, -3, 0
    feed(c, 0, acts, seq_ids, batch=2)
    rows = by_neuron(c.layers[0].records_table())[0]
    assert [(r["rank"], r["seq_id"]) for r in rows["bottom"]] == [(0, 20), (1, 40), (2, 30)]
    assert rows["bottom"][0]["activations"] == [-3.0, 9.0] and rows["bottom"][0]["max_activation"] == 9.0
    assert [r["seq_id"] for r in rows["top"]] == [20]  # max 9.0
    assert c.layers[0].stats_table().to_pylist()[0]["min"] == -3.0


def test_nonfinite_activations_by_hand():
    """fp16 overflow leaves ±inf (and NaN after inf - inf): counted per neuron, left out of every statistic,
    and a window holding one ranks after every all-finite window, top and bottom, so it is a record only
    when there are too few of those (here: top_k = 3 of 4 windows, 2 of them clean)."""
    nan, inf = float("nan"), float("inf")
    spec = CollectorSpec([0], n_neurons=2, seq_len=3, top_k=3, n_random=0, seed=0, bottom_k=3)
    c = ActivationCollector(spec)
    acts = torch.tensor([
        [[1.0, 1.0], [inf, 2.0], [5.0, 3.0]],  # seq 0: neuron 0 has +inf (its finite max 5.0 must not count)
        [[2.0, 4.0], [-1.0, 5.0], [0.0, 6.0]],  # seq 1: clean, max 2.0, min -1.0
        [[nan, 7.0], [-inf, 8.0], [9.0, 9.0]],  # seq 2: NaN and -inf
        [[-2.0, 1.0], [3.0, 1.0], [1.0, 1.0]],  # seq 3: clean, max 3.0, min -2.0
    ])
    feed(c, 0, acts, torch.arange(4), batch=3)
    rows = by_neuron(c.layers[0].records_table())[0]
    assert [r["seq_id"] for r in rows["top"]] == [3, 1, 0]  # the clean ones by max, then the dirty by seq_id
    assert [r["seq_id"] for r in rows["bottom"]] == [3, 1, 0]  # min -2, -1, then dirty
    assert rows["top"][2]["max_activation"] == 5.0  # the window's max over its finite tokens
    s0, s1 = c.layers[0].stats_table().to_pylist()
    finite = [1.0, 5.0, 2.0, -1.0, 0.0, 9.0, -2.0, 3.0, 1.0]  # neuron 0's 9 finite tokens of 12
    assert (s0["n_tokens"], s0["n_nonfinite"]) == (12, 3)
    assert s0["mean"] == pytest.approx(np.mean(finite), abs=1e-12)
    assert s0["variance"] == pytest.approx(np.var(finite), abs=1e-12)
    assert (s0["max"], s0["min"]) == (9.0, -2.0)
    assert s0["frac_positive"] == pytest.approx(6 / 9, abs=1e-12)
    assert s1["n_nonfinite"] == 0 and s1["mean"] == pytest.approx(4.0, abs=1e-12)  # the other neuron untouched


def test_a_neuron_with_no_finite_activation_has_null_statistics():
    c = ActivationCollector(CollectorSpec([0], 2, 2, 1, 0, 0))
    feed(c, 0, torch.tensor([[[float("nan"), 1.0], [float("inf"), 2.0]]]), torch.arange(1), batch=1)
    s0, s1 = c.layers[0].stats_table().to_pylist()
    assert s0["n_nonfinite"] == 2 and all(s0[k] is None for k in ("mean", "variance", "max", "min", "frac_positive"))
    assert (s1["mean"], s1["max"], s1["min"]) == (1.5, 2.0, 1.0)


def test_synthetic_with_nonfinite_activations_matches_brute_force():
    acts = synthetic(41, 3, 6, seed=4, nonfinite=0.08)
    seq_ids = torch.randperm(1000, generator=torch.Generator().manual_seed(4))[:41]
    c = ActivationCollector(CollectorSpec([2], 6, 3, top_k=9, n_random=6, seed=SEED, corpus=seq_ids.tolist(),
                                          bottom_k=7))
    feed(c, 2, acts, seq_ids, batch=5)
    assert int(c.layers[2].stats.n_nonfinite.sum()) == int((~torch.isfinite(acts)).sum()) > 0
    check_against_oracle(c, 2, acts.numpy(), seq_ids, 9, 6, bottom_k=7)


def test_fp16_overflow_through_a_real_forward(tiny_llama):
    """A tiny Llama in float16 with its up projection scaled so that every 4th neuron overflows to ±inf on some
    tokens (on 35 % to 90 % of the windows): the records and statistics of every neuron follow the brute-force
    rule over the model's own activations."""
    import copy

    from workers.models.loading import wrap
    model = wrap(copy.deepcopy(tiny_llama.model).to(torch.float16), tiny_llama.tokenizer, "tiny-llama-fp16")
    with torch.no_grad():
        up = model.model.model.layers[0].mlp.up_proj.weight
        up.mul_(3e4)  # activations up to ~1e3
        up[::4].mul_(10)
    token_ids, seq_ids = windows_of(model, n=20)
    spec = CollectorSpec([0], 64, 16, top_k=4, n_random=3, seed=SEED, corpus=seq_ids.tolist(), bottom_k=4)
    collector = ActivationCollector(spec, dtype=torch.float16)
    extractor = ActivationExtractor(model, collector)
    extractor.run(token_ids, seq_ids, batch_size=8)
    extractor.close()
    acts = all_activations(model, [0], token_ids, batch_size=8)[0]
    assert 0.005 < (~np.isfinite(acts)).mean() < 0.05
    check_against_oracle(collector, 0, acts, seq_ids, 4, 3, bottom_k=4)


def test_negative_zero_ties_with_zero():
    keys = float_order_key(torch.tensor([-0.0, 0.0, -1e-30, 1e-30, float("-inf")]))
    assert keys[0] == keys[1] and keys[4] < keys[2] < keys[0] < keys[3]


def test_random_priorities_on_the_device_equal_the_python_reference():
    salts = neuron_salts(123456789, 5, 4, "cpu")
    seq = torch.tensor([0, 1, 2 ** 31 + 5, 2 ** 32 - 1])
    got = random_priorities(salts, seq)
    want = [[random_priority_py(123456789, 5, n, int(s)) for s in seq] for n in range(4)]
    assert got.tolist() == want
    assert all(0 <= v < 2 ** 31 for row in want for v in row)


def test_random_sample_on_the_device_equals_the_python_reference():
    corpus = [3, 8, 9, 20, 21, 40, 41, 77, 90, 91, 99]
    got = random_sample(SEED, 4, 6, torch.tensor(corpus), 5)
    assert got.tolist() == [random_sample_py(SEED, 4, n, corpus, 5) for n in range(6)]
    assert random_sample(SEED, 4, 2, torch.tensor([5, 6]), 5).tolist() == \
        [random_sample_py(SEED, 4, n, [5, 6], 5) for n in range(2)]  # fewer windows than n_random: all of them


def test_random_records_are_uniform_and_independent_per_neuron():
    """Each window is sampled with probability n_random / n_windows; neurons do not share a sample."""
    n_windows, n_neurons, k = 50, 400, 5
    chosen = random_sample(SEED, 0, n_neurons, torch.arange(n_windows), k)
    assert all(len(set(row)) == k for row in chosen.tolist())  # without replacement
    counts = torch.bincount(chosen.reshape(-1), minlength=n_windows).float()
    expected = n_neurons * k / n_windows  # 40 per window
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 100  # 49 degrees of freedom: p < 1e-5 above 100
    assert len({tuple(sorted(r)) for r in chosen.tolist()}) > n_neurons * 0.99
    first = torch.bincount(chosen[:, 0], minlength=n_windows).float()  # rank 0 is uniform too (order is random)
    assert float(((first - n_neurons / n_windows) ** 2 / (n_neurons / n_windows)).sum()) < 100


def test_synthetic_with_ties_matches_brute_force():
    acts = synthetic(37, 3, 5, seed=1)
    seq_ids = torch.randperm(1000, generator=torch.Generator().manual_seed(1))[:37]
    c = ActivationCollector(CollectorSpec([2], 5, 3, top_k=8, n_random=6, seed=SEED, corpus=seq_ids.tolist()))
    feed(c, 2, acts, seq_ids, batch=4)
    check_against_oracle(c, 2, acts.numpy(), seq_ids, 8, 6)


def state(c):
    layer = c.layers[next(iter(c.layers))]
    q = layer.quantiles
    return (layer.top.sorted(), layer.bottom.sorted(), (layer.random.seq, layer.random.acts, layer.random.filled),
            layer.stats, (q.counts, q.keys) if q is not None else ())


def bits_equal(a, b):
    """Equal tensors, NaN included (the records keep non-finite activations as they were)."""
    return a.shape == b.shape and torch.equal(a.view(torch.int32) if a.is_floating_point() else a,
                                              b.view(torch.int32) if b.is_floating_point() else b)


def assert_same(a, b):
    (ta, ba, ra, sa, qa), (tb, bb, rb, sb, qb) = state(a), state(b)
    for x, y in ((ta, tb), (ba, bb)):
        f = x[2]
        assert f == y[2] and torch.equal(x[0][:, :f], y[0][:, :f]) and bits_equal(x[1][:, :f], y[1][:, :f])
    assert all(bits_equal(x, y) for x, y in zip(ra, rb, strict=True))
    assert all(torch.equal(x, y) for x, y in zip(qa, qb, strict=True))
    assert sa.n == sb.n and torch.equal(sa.n_nonfinite, sb.n_nonfinite) and torch.equal(sa.n_pos, sb.n_pos)
    assert torch.equal(sa.max, sb.max) and torch.equal(sa.min, sb.min)
    torch.testing.assert_close(sa.mean, sb.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sa.m2, sb.m2, rtol=1e-12, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(n_windows=st.integers(1, 40), parts=st.integers(1, 4), batch=st.integers(1, 9), top_k=st.integers(1, 6),
       n_random=st.integers(0, 6), bottom_k=st.integers(0, 5), n_per_quantile=st.integers(0, 3),
       nonfinite=st.sampled_from([0.0, 0.1]), seed=st.integers(0, 10 ** 6))
def test_merging_slices_equals_one_collector_over_everything(n_windows, parts, batch, top_k, n_random, bottom_k,
                                                             n_per_quantile, nonfinite, seed):
    acts = synthetic(n_windows, 4, 3, seed, nonfinite=nonfinite)
    g = torch.Generator().manual_seed(seed)
    seq_ids = torch.randperm(10 * n_windows, generator=g)[:n_windows]
    spec = CollectorSpec([1], 3, 4, top_k, n_random, seed, corpus=seq_ids.tolist(), bottom_k=bottom_k,
                         n_per_quantile=n_per_quantile)
    whole = ActivationCollector(spec)
    feed(whole, 1, acts, seq_ids, batch)
    cuts = sorted({0, n_windows, *torch.randint(0, n_windows + 1, (parts - 1,), generator=g).tolist()})
    merged = ActivationCollector(spec)
    for i, (lo, hi) in enumerate(zip(cuts, cuts[1:])):
        part = ActivationCollector(spec)
        part.done_chunks = {i}
        feed(part, 1, acts[lo:hi], seq_ids[lo:hi], batch + i)
        merged.merge(part)
    assert_same(whole, merged)
    assert merged.n_windows == n_windows
    assert bool(merged.layers[1].random.filled.all())


@settings(max_examples=30, deadline=None)
@given(n_windows=st.integers(1, 60), k=st.integers(1, 7), spare=st.integers(1, 9), batch=st.integers(1, 11),
       seed=st.integers(0, 10 ** 6))
def test_top_reservoir_with_few_spare_slots_keeps_the_exact_top_k(n_windows, k, spare, batch, seed):
    """Floor raises happen all the time with one spare slot; the result must not depend on them."""
    g = torch.Generator().manual_seed(seed)
    keys = torch.randperm(10 ** 6, generator=g)[:2 * n_windows].reshape(2, n_windows) * 7 + 2 ** 40
    acts = torch.randn(n_windows, 3, 2, generator=g)
    res = TopReservoir(2, k, 3, torch.float32, "cpu", spare=spare)
    for i in range(0, n_windows, batch):
        res.offer(keys[:, i:i + batch], acts[i:i + batch])
    got_keys, got_acts, filled = res.sorted()
    want = keys.sort(dim=1, descending=True)
    assert filled == min(k, n_windows)
    assert torch.equal(got_keys[:, :filled], want.values[:, :filled])
    for n in range(2):
        assert torch.equal(got_acts[n, :filled], acts[want.indices[n, :filled], :, n])


def test_state_dict_round_trip_then_continue():
    spec = CollectorSpec([0], 4, 3, 3, 2, SEED, corpus=range(20), bottom_k=2, n_per_quantile=2)
    acts, seq_ids = synthetic(20, 3, 4, seed=3, nonfinite=0.05), torch.arange(20)
    whole = ActivationCollector(spec)
    feed(whole, 0, acts, seq_ids, 5)
    first = ActivationCollector(spec)
    feed(first, 0, acts[:10], seq_ids[:10], 5)
    first.done_chunks = {0}
    resumed = ActivationCollector(spec)
    resumed.load_state_dict(tensor_load(tensor_bytes(first.state_dict())))
    assert resumed.done_chunks == {0} and resumed.n_windows == 10
    feed(resumed, 0, acts[10:], seq_ids[10:], 5)
    assert_same(whole, resumed)


def test_merging_overlapping_chunks_is_refused():
    spec = CollectorSpec([0], 2, 2, 1, 0, 0)
    a, b = ActivationCollector(spec), ActivationCollector(spec)
    a.done_chunks, b.done_chunks = {1, 2}, {2, 3}
    with pytest.raises(ExtractError, match=r"both cover chunks \[2\]"):
        a.merge(b)


def test_bf16_activations_are_kept_exactly():
    acts = (torch.randn(6, 4, 3, generator=torch.Generator().manual_seed(0)) * 3).to(torch.bfloat16)
    c = ActivationCollector(CollectorSpec([0], 3, 4, 2, 0, 0), dtype=torch.bfloat16)
    feed(c, 0, acts, torch.arange(6), 4)
    rows = by_neuron(c.layers[0].records_table())
    wmax = acts.float().amax(1)
    for n in range(3):
        best = int(wmax[:, n].argmax())
        assert rows[n]["top"][0]["activations"] == acts[best, :, n].float().tolist()


# --- quantile records ---------------------------------------------------------------------------------------
def test_quantile_bins_are_exact_positions_by_quantile():
    assert quantile_bin_bounds(1000) == [(0, 500), (500, 900), (900, 990), (990, 999)]  # the top window: none
    assert quantile_bin_bounds(120) == [(0, 60), (60, 108), (108, 119), (119, 120)]
    assert quantile_bin_bounds(10) == [(0, 5), (5, 9), (9, 10), (10, 10)]  # too few windows: the last bin is empty
    assert quantile_bin_bounds(0) == [(0, 0)] * 4


def test_quantile_picks_by_hand():
    """Six windows, one neuron: ascending by max (ties: higher seq_id first) -> positions; W = 6 gives bins
    [0, 3), [3, 6), [6, 6), [6, 6); each bin keeps its window of smallest priority."""
    seq = [10, 11, 12, 13, 14, 15]
    maxima = torch.tensor([[5.0], [1.0], [1.0], [9.0], [0.0], [7.0]])  # ascending: 14, 12, 11 | 10, 15, 13
    prio = {s: quantile_priority_py(SEED, 2, 0, s) for s in seq}
    want = [min((14, 12, 11), key=prio.get), min((10, 15, 13), key=prio.get), -1, -1]
    assert quantile_picks(SEED, 2, torch.tensor(seq), maxima, 1).tolist() == [want]


@settings(max_examples=40, deadline=None)
@given(n_windows=st.integers(0, 260), n_neurons=st.integers(1, 4), n_per=st.integers(1, 3),
       levels=st.integers(1, 6), seed=st.integers(0, 10 ** 6))
def test_quantile_picks_equal_the_slow_reference(n_windows, n_neurons, n_per, levels, seed):
    """Integer maxima tie all the time, which tests the tie rule."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randperm(10 * n_windows + 1, generator=g)[:n_windows]
    maxima = torch.randint(-1, levels, (n_windows, n_neurons), generator=g).to(torch.bfloat16)
    got = quantile_picks(seed, 1, seq, maxima, n_per)
    for n in range(n_neurons):
        want = quantile_picks_py(seed, 1, n, seq.tolist(), maxima[:, n].float().tolist(), n_per)
        assert [(r, s) for r, s in enumerate(got[n].tolist()) if s >= 0] == want


# --- the quantile sketch -----------------------------------------------------------------------------------
def test_buckets_by_hand():
    """16 buckets per octave from 2**-8 up, one zero bucket below, the outermost from 2**16 (65536) on."""
    got = bucket_of(torch.tensor([1.0, 1.0624, 1.0625, -1.0, 2 ** -8, 2 ** -8 * 0.999, -0.0, 1e-30, 65535.0,
                                  65536.0, 3e38, float("-inf")])).tolist()
    assert got == [ZERO + 129, ZERO + 129, ZERO + 130, ZERO - 129, ZERO + 1, ZERO, ZERO, ZERO, N_BUCKETS - 2,
                   N_BUCKETS - 1, N_BUCKETS - 1, 0]
    assert bucket_bounds(ZERO + 129) == (1.0, 1.0625) and bucket_bounds(ZERO - 129) == (-1.0625, -1.0)
    assert bucket_bounds(ZERO + 1) == (2 ** -8, 2 ** -8 * 1.0625) and bucket_bounds(ZERO) == (-2 ** -8, 2 ** -8)
    assert bucket_bounds(N_BUCKETS - 2) == (65536.0 * (1 - 1 / 32), 65536.0)
    assert bucket_bounds(N_BUCKETS - 1) == (65536.0, float("inf")) and N_BUCKETS == 771


@settings(max_examples=60, deadline=None)
@given(st.lists(st.floats(width=32, allow_nan=False, allow_infinity=False), min_size=1, max_size=50))
def test_buckets_are_ordered_hold_their_values_and_equal_the_python_reference(values):
    got = bucket_of(torch.tensor(values)).tolist()
    assert got == [bucket_of_py(v) for v in values]
    for v, j in zip(values, got):
        low, high = bucket_bounds(j)
        assert (low <= v < high) if j > ZERO else (low < v <= high) if j < ZERO else (low < v < high)
    by_value = [j for _, j in sorted(zip(values, got))]
    assert by_value == sorted(by_value)


def test_bins_of_buckets_by_hand():
    """W = 20: exact bins are positions [0, 10), [10, 18), [18, 20), [20, 20). Buckets of 9, 3, 6, 1, 1 windows
    have median positions 4, 10, 14, 18, 19: bins 0, 1, 1, 2, 2."""
    counts = torch.zeros(1, N_BUCKETS, dtype=torch.int64)
    counts[0, [3, 7, 8, 20, 30]] = torch.tensor([9, 3, 6, 1, 1])
    bins = bins_of_buckets(counts)[0]
    assert bins[[3, 7, 8, 20, 30]].tolist() == [0, 1, 1, 2, 2]
    assert int((bins >= 0).sum()) == 5  # empty buckets belong to no bin


def feed_sketch(sketch, maxima, seq_ids, batch, clean=None):
    for i in range(0, len(seq_ids), batch):
        sketch.update(maxima[i:i + batch], seq_ids[i:i + batch], None if clean is None else clean[i:i + batch])


@settings(max_examples=40, deadline=None)
@given(n_windows=st.integers(0, 300), n_neurons=st.integers(1, 3), n_per=st.integers(1, 3), parts=st.integers(1, 3),
       batch=st.integers(1, 40), scale=st.sampled_from([1e-3, 1.0, 1e3]), seed=st.integers(0, 10 ** 6))
def test_sketch_picks_equal_the_slow_reference_whatever_the_slices(n_windows, n_neurons, n_per, parts, batch,
                                                                   scale, seed):
    """The per-bucket candidates, merged over slices of the corpus in any batches, pick what the slow reference
    picks from all windows at once; a window holding a non-finite activation is never picked."""
    g = torch.Generator().manual_seed(seed)
    seq = torch.randperm(10 * n_windows + 1, generator=g)[:n_windows]
    maxima = (torch.randn(n_windows, n_neurons, generator=g) * scale).round(decimals=1)  # ties across windows
    clean = torch.rand(n_windows, n_neurons, generator=g) > 0.1
    cuts = sorted({0, n_windows, *torch.randint(0, n_windows + 1, (parts - 1,), generator=g).tolist()})
    merged = QuantileSketch(n_neurons, n_per, seed, 3, "cpu")
    for lo, hi in zip(cuts, cuts[1:]):
        part = QuantileSketch(n_neurons, n_per, seed, 3, "cpu")
        feed_sketch(part, maxima[lo:hi], seq[lo:hi], batch, clean[lo:hi])
        merged.merge(part)
    got = merged.picks()
    for n in range(n_neurons):
        keep = clean[:, n]
        want = sketch_picks_py(seed, 3, n, seq[keep].tolist(), maxima[keep, n].tolist(), n_per)
        assert [(r, s) for r, s in enumerate(got[n].tolist()) if s >= 0] == want
    assert merged.counts.sum(1).tolist() == clean.sum(0).tolist()


def exact_positions(maxima, seq):
    """Each window's position among the neuron's windows sorted as the exact rule does (docs/method.md §2)."""
    order = sorted(range(len(seq)), key=lambda i: (maxima[i], -seq[i]))
    pos = [0] * len(seq)
    for p, i in enumerate(order):
        pos[i] = p
    return pos, [maxima[i] for i in order]


def test_sketch_bins_agree_with_exact_quantiles_within_one_bucket():
    """10^4 windows, neurons of different shapes: the exact bins from every window's max, the sketch's from its
    histogram. A window is in another bin only inside a bucket that holds an exact bin edge (so its max is
    within one bucket, relative 6.25 %, of that edge's value); the sketch's quantile values are within half a
    bucket of the exact ones."""
    w = 10_000
    g = torch.Generator().manual_seed(11)
    maxima = torch.stack([
        torch.randn(w, generator=g).exp(),  # log-normal, positive
        torch.randn(w, generator=g) * 3,  # both signs, crossing the zero bucket
        (torch.rand(w, generator=g) * 8).floor() - 2,  # 8 values only: heavy ties
        torch.randn(w, generator=g).exp() * 1e-3,  # mostly inside the zero bucket
    ], dim=1).float()
    seq = torch.randperm(10 * w, generator=g)[:w]
    sketch = QuantileSketch(4, 2, SEED, 0, "cpu")
    feed_sketch(sketch, maxima, seq, 512)
    bins = bins_of_buckets(sketch.counts)
    values = sketch.quantile_values()
    bounds = quantile_bin_bounds(w)
    edges = [lo for lo, _ in bounds[1:]] + [bounds[-1][1]]  # positions 5000, 9000, 9900, 9990
    for n in range(4):
        m = maxima[:, n].tolist()
        pos, ordered = exact_positions(m, seq.tolist())
        bucket = bucket_of(maxima[:, n]).tolist()
        edge_buckets = {bucket_of_py(ordered[p]) for p in edges}
        exact_bin = [next((b for b, (lo, hi) in enumerate(bounds) if lo <= p < hi), -1) for p in pos]
        moved = [i for i in range(w) if int(bins[n, bucket[i]]) != exact_bin[i]]
        assert all(bucket[i] in edge_buckets for i in moved), f"neuron {n}"
        for i in moved:
            edge_value = min((ordered[p] for p in edges if bucket_of_py(ordered[p]) == bucket[i]),
                             key=lambda v: abs(v - m[i]))
            assert abs(m[i] - edge_value) <= RELATIVE_WIDTH * max(abs(edge_value), abs(m[i])) + 2 ** MIN_EXP
        for q, p in enumerate(edges):
            exact = ordered[p]
            assert abs(float(values[n, q]) - exact) <= RELATIVE_WIDTH / 2 * abs(exact) + 2 ** MIN_EXP, (n, q)
        if n == 0:  # a smooth distribution: the sketch moves few windows
            assert len(moved) < 0.02 * w


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    def broken(*a, **k):
        raise RuntimeError("InductorError: no working C compiler found\nlong trace ...")
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: broken)
    summarize = capture.compiled_summaries()
    x = torch.randn(3, 4, 5, generator=torch.Generator().manual_seed(0))
    seq_ids, floor = torch.arange(3), torch.zeros(5, 1, dtype=torch.int64)
    with caplog.at_level("WARNING", logger="workers.extract.capture"):
        first, second = summarize(x, seq_ids, floor, floor), summarize(x, seq_ids, floor, floor)
    want = capture.window_summaries(x, seq_ids, floor, floor)
    assert all(torch.equal(a, b) for got in (first, second) for a, b in zip(got, want, strict=True))
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the per-window reductions failed (RuntimeError: InductorError: no working C compiler "
        "found); running them eagerly"]


def test_tiny_models_are_not_compiled():
    assert not wants_compile(CollectorSpec([0, 1], 64, 16, 4, 3, 0), "cpu")
    assert wants_compile(CollectorSpec(list(range(30)), 1536, 64, 20, 15, 0), "cpu")
