"""The activation collector against brute force: every activation materialised, top/random/stats the slow way."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.config import Corpus
from workers.extract.corpus import iter_windows
from workers.extract.worker import (ActivationCollector, ActivationExtractor, CollectorSpec, LayerCapture, TopReservoir,
                             float_order_key, random_priorities, random_priority_py, random_sample, random_sample_py, tensor_bytes,
                             tensor_load)

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


def slow_summary(acts, seq_ids, layer, top_k, n_random, seed=SEED):
    """acts [W, T, N] -> per neuron: top (seq_ids), random (seq_ids), stats - straight from the definitions."""
    out = []
    for n in range(acts.shape[2]):
        a = acts[:, :, n]
        wmax = a.max(1)
        top = sorted(range(len(seq_ids)), key=lambda i: (-wmax[i], seq_ids[i]))[:top_k]
        pos = {int(s): i for i, s in enumerate(seq_ids)}
        rnd = [pos[s] for s in random_sample_py(seed, layer, n, [int(s) for s in seq_ids], n_random)]
        flat = a.astype(np.float64).reshape(-1)
        out.append({"top": [int(seq_ids[i]) for i in top], "random": [int(seq_ids[i]) for i in rnd],
                    "top_acts": a[top], "random_acts": a[rnd], "mean": flat.mean(), "variance": flat.var(),
                    "max": a.max(), "frac_positive": (flat > 0).mean(), "n_tokens": flat.size})
    return out


def by_neuron(records):
    rows = {}
    for r in records.to_pylist():
        rows.setdefault(r["neuron"], {}).setdefault(r["kind"], []).append(r)
    return rows


def check_against_oracle(collector, layer, acts, seq_ids, top_k, n_random):
    want = slow_summary(acts, seq_ids.numpy(), layer, top_k, n_random)
    got = by_neuron(collector.layers[layer].records_table())
    stats = collector.layers[layer].stats_table().to_pylist()
    for n, w in enumerate(want):
        top, rnd = got[n]["top"], got[n].get("random", [])
        assert [r["seq_id"] for r in top] == w["top"], f"neuron {n}"
        assert [r["rank"] for r in top] == list(range(len(w["top"])))
        assert [r["seq_id"] for r in rnd] == w["random"], f"neuron {n}"
        np.testing.assert_allclose([r["activations"] for r in top], w["top_acts"], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([r["activations"] for r in rnd], w["random_acts"].reshape(len(rnd), -1),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose([r["max_activation"] for r in top], w["top_acts"].max(1), rtol=1e-5, atol=1e-6)
        s = stats[n]
        assert s["neuron"] == n and s["n_tokens"] == w["n_tokens"]
        assert s["frac_positive"] == pytest.approx(w["frac_positive"], abs=1e-12)
        assert s["max"] == pytest.approx(w["max"], rel=1e-5, abs=1e-6)
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
    spec = CollectorSpec([0, 1], model.info.n_neurons, 16, top_k=6, n_random=5, seed=SEED, corpus=seq_ids.tolist())
    collector = ActivationCollector(spec)
    extractor = ActivationExtractor(model, collector)
    extractor.run(token_ids, seq_ids, batch_size=7)  # uneven batches: 6 x 7 + 3
    extractor.close()
    acts = all_activations(model, [0, 1], token_ids, batch_size=7)
    for layer in (0, 1):
        check_against_oracle(collector, layer, acts[layer], seq_ids, 6, 5)
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

    import workers.extract.worker as ex
    from workers.models.loading import wrap
    if slice_windows:
        monkeypatch.setattr(ex, "CPU_SLICE_BYTES", slice_windows * 16 * 64 * 2)
        assert ex.slice_rows(torch.zeros(8, 16, 64, dtype=torch.bfloat16)) == slice_windows
    model = wrap(copy.deepcopy(tiny_llama.model).to(torch.bfloat16), tiny_llama.tokenizer, "tiny-llama-bf16")
    token_ids, seq_ids = windows_of(model, n=24)
    spec = CollectorSpec([0, 1], 64, 16, top_k=4, n_random=3, seed=SEED, corpus=seq_ids.tolist())
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
        for col in ("mean", "variance", "max", "frac_positive"):
            np.testing.assert_allclose(stats_compiled.column(col).to_numpy(), stats_eager.column(col).to_numpy(),
                                       rtol=1e-6, atol=1e-9)


def synthetic(n_windows, seq_len, n_neurons, seed, levels=4):
    """Small integer activations: window maxima tie all the time, which tests the tie rule."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-1, levels - 1, (n_windows, seq_len, n_neurons), generator=g).float()


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


def test_negative_zero_ties_with_zero():
    keys = float_order_key(torch.tensor([-0.0, 0.0, -1e-30, 1e-30, float("-inf")]))
    assert keys[0] == keys[1] and keys[4] < keys[2] < keys[0] < keys[3]


def test_random_priorities_on_the_device_equal_the_python_reference():
    from workers.extract.worker import neuron_salts
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
    seq_ids = torch.randperm(1000)[:37]
    c = ActivationCollector(CollectorSpec([2], 5, 3, top_k=8, n_random=6, seed=SEED, corpus=seq_ids.tolist()))
    feed(c, 2, acts, seq_ids, batch=4)
    check_against_oracle(c, 2, acts.numpy(), seq_ids, 8, 6)


def state(c):
    layer = c.layers[next(iter(c.layers))]
    return layer.top.sorted(), (layer.random.seq, layer.random.acts, layer.random.filled), layer.stats


def assert_same(a, b):
    (ta, ra, sa), (tb, rb, sb) = state(a), state(b)
    f = ta[2]
    assert f == tb[2] and torch.equal(ta[0][:, :f], tb[0][:, :f]) and torch.equal(ta[1][:, :f], tb[1][:, :f])
    assert all(torch.equal(x, y) for x, y in zip(ra, rb))
    assert sa.n == sb.n and torch.equal(sa.max, sb.max) and torch.equal(sa.n_pos, sb.n_pos)
    torch.testing.assert_close(sa.mean, sb.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sa.m2, sb.m2, rtol=1e-12, atol=1e-10)


@settings(max_examples=40, deadline=None)
@given(n_windows=st.integers(1, 40), parts=st.integers(1, 4), batch=st.integers(1, 9), top_k=st.integers(1, 6),
       n_random=st.integers(0, 6), seed=st.integers(0, 10 ** 6))
def test_merging_slices_equals_one_collector_over_everything(n_windows, parts, batch, top_k, n_random, seed):
    acts = synthetic(n_windows, 4, 3, seed)
    seq_ids = torch.randperm(10 * n_windows, generator=torch.Generator().manual_seed(seed))[:n_windows]
    spec = CollectorSpec([1], 3, 4, top_k, n_random, seed, corpus=seq_ids.tolist())
    whole = ActivationCollector(spec)
    feed(whole, 1, acts, seq_ids, batch)
    cuts = sorted({0, n_windows, *torch.randint(0, n_windows + 1, (parts - 1,)).tolist()})
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
    spec = CollectorSpec([0], 4, 3, 3, 2, SEED, corpus=range(20))
    acts, seq_ids = synthetic(20, 3, 4, seed=3), torch.arange(20)
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
    from workers.extract.worker import ExtractError
    spec = CollectorSpec([0], 2, 2, 1, 0, 0)
    a, b = ActivationCollector(spec), ActivationCollector(spec)
    a.done_chunks, b.done_chunks = {1, 2}, {2, 3}
    with pytest.raises(ExtractError, match=r"both cover chunks \[2\]"):
        a.merge(b)


def test_bf16_activations_are_kept_exactly():
    acts = (torch.randn(6, 4, 3) * 3).to(torch.bfloat16)
    c = ActivationCollector(CollectorSpec([0], 3, 4, 2, 0, 0), dtype=torch.bfloat16)
    feed(c, 0, acts, torch.arange(6), 4)
    rows = by_neuron(c.layers[0].records_table())
    wmax = acts.float().amax(1)
    for n in range(3):
        best = int(wmax[:, n].argmax())
        assert rows[n]["top"][0]["activations"] == acts[best, :, n].float().tolist()


# --- quantile records ---------------------------------------------------------------------------------------
def test_quantile_bins_are_exact_positions_by_quantile():
    from workers.extract.worker import quantile_bin_bounds
    assert quantile_bin_bounds(1000) == [(0, 500), (500, 900), (900, 990), (990, 999)]  # the top window: none
    assert quantile_bin_bounds(120) == [(0, 60), (60, 108), (108, 119), (119, 120)]
    assert quantile_bin_bounds(10) == [(0, 5), (5, 9), (9, 10), (10, 10)]  # too few windows: the last bin is empty
    assert quantile_bin_bounds(0) == [(0, 0)] * 4


def test_quantile_picks_by_hand():
    """Six windows, one neuron: ascending by max (ties: higher seq_id first) -> positions; W = 6 gives bins
    [0, 3), [3, 6), [6, 6), [6, 6); each bin keeps its window of smallest priority."""
    from workers.extract.worker import quantile_picks, quantile_priority_py
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
    from workers.extract.worker import quantile_picks, quantile_picks_py
    g = torch.Generator().manual_seed(seed)
    seq = torch.randperm(10 * n_windows + 1, generator=g)[:n_windows]
    maxima = torch.randint(-1, levels, (n_windows, n_neurons), generator=g).to(torch.bfloat16)
    got = quantile_picks(seed, 1, seq, maxima, n_per)
    for n in range(n_neurons):
        want = quantile_picks_py(seed, 1, n, seq.tolist(), maxima[:, n].float().tolist(), n_per)
        assert [(r, s) for r, s in enumerate(got[n].tolist()) if s >= 0] == want


def test_a_failing_compile_falls_back_to_eager_with_one_warning(monkeypatch, caplog):
    import workers.extract.worker as ex

    def broken(*a, **k):
        raise RuntimeError("InductorError: no working C compiler found\nlong trace ...")
    monkeypatch.setattr(ex.torch, "compile", lambda fn, **kw: broken)
    summarize = ex.compiled_summaries()
    x, seq_ids, floor = torch.randn(3, 4, 5), torch.arange(3), torch.zeros(5, 1, dtype=torch.int64)
    with caplog.at_level("WARNING", logger="workers.extract.worker"):
        first, second = summarize(x, seq_ids, floor), summarize(x, seq_ids, floor)
    want = ex.window_summaries(x, seq_ids, floor)
    assert all(torch.equal(a, b) for got in (first, second) for a, b in zip(got, want))
    assert [r.getMessage() for r in caplog.records] == [
        "torch.compile of the per-window reductions failed (RuntimeError: InductorError: no working C compiler "
        "found); running them eagerly"]


def test_tiny_models_are_not_compiled():
    from workers.extract.worker import wants_compile
    assert not wants_compile(CollectorSpec([0, 1], 64, 16, 4, 3, 0), "cpu")
    assert wants_compile(CollectorSpec(list(range(30)), 1536, 64, 20, 15, 0), "cpu")
