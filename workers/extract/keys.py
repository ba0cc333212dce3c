"""Seeded hashes and int64 sort keys of extraction: which windows are a neuron's random and quantile records,
and in what order its top records rank. Pure functions over tensors, each with a slow Python reference
(`*_py`) that the tests hold the tensor version to; no model, no store.

Random records: `n_random` windows drawn uniformly without replacement from the run's corpus, independently
per neuron, by Floyd's algorithm driven by a hash of (seed, layer, neuron, draw). The sample is fixed before
the first batch (it needs only the corpus' seq ids), so a batch copies just the windows that are in it and
slices of the corpus merge by union. Records are ranked by a second hash of (seed, layer, neuron, seq_id).

Top records are ranked by one int64 key: the window max as an order-preserving integer in the high half and
`2**32 - 1 - seq_id` in the low half. Keys are unique per neuron, so "keep the k largest keys" is exact,
tie-breaking included, and a merge of two reservoirs is the reservoir of the union (collectors.py). Bottom
records use the same key on minus the window min. A window holding a non-finite activation gets the primary
of a maximum of -inf (`NONFINITE_PRIMARY`), below every all-finite window's (docs/method.md §2).

Quantile records (docs/method.md §2): each quantile bin keeps its windows of smallest hash priority
(`quantile_priority_py`). A run picks them from a mergeable sketch of the window maxima (sketch.py);
`quantile_picks` is the exact rule over every window's maxima, which the sketch is tested and benchmarked
against (its memory grows with the corpus: a few [N, W] int64).
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction

import torch

INT64_MIN = -(2 ** 63)
LOW_MASK = 2 ** 32 - 1
MAX_SEQ_ID = LOW_MASK
MASK64 = 2 ** 64 - 1
MIX1, MIX2, GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15
DRAW_TAG = 0xD1B54A32D192ED03  # separates the draw stream of Floyd's algorithm from the ranking hash
PRIORITY_BITS = 31
QUANTILE_TAG = 0x3C6EF372FE94F82B  # separates the quantile picks' hash from the random records' hashes
# quantile bins of the window maxima (docs/method.md §2): [0, 0.5), [0.5, 0.9), [0.9, 0.99), [0.99, 0.999)
QUANTILE_EDGES = (Fraction(0), Fraction(1, 2), Fraction(9, 10), Fraction(99, 100), Fraction(999, 1000))
N_QUANTILE_BINS = len(QUANTILE_EDGES) - 1
NONFINITE_PRIMARY = -2139095041  # float_order_key(-inf): a window with a NaN or ±inf ranks as if its max were -inf


def _signed(c: int) -> int:
    return c - 2 ** 64 if c >= 2 ** 63 else c


def _shr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's >> is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def mix64(z: torch.Tensor) -> torch.Tensor:
    """splitmix64's finalizer on int64 tensors; multiplication wraps modulo 2**64 as in the Python oracle."""
    z = (z ^ _shr(z, 30)) * _signed(MIX1)
    z = (z ^ _shr(z, 27)) * _signed(MIX2)
    return z ^ _shr(z, 31)


def mix64_py(z: int) -> int:
    z &= MASK64
    z = ((z ^ (z >> 30)) * MIX1) & MASK64
    z = ((z ^ (z >> 27)) * MIX2) & MASK64
    return z ^ (z >> 31)


def neuron_salt_py(seed: int, layer: int, neuron: int) -> int:
    return mix64_py(mix64_py(mix64_py(seed) + layer) * GOLDEN + neuron)


def random_priority_py(seed: int, layer: int, neuron: int, seq_id: int) -> int:
    """The rank key of a random record: smaller comes first (the slow reference)."""
    return mix64_py(neuron_salt_py(seed, layer, neuron) + seq_id * GOLDEN) >> (64 - PRIORITY_BITS)


def uniform_below_py(seed: int, layer: int, neuron: int, draw: int, bound: int) -> int:
    """Draw number `draw` of a neuron's stream, uniform in [0, bound) (bound <= 2**32)."""
    u = mix64_py((neuron_salt_py(seed, layer, neuron) ^ DRAW_TAG) + draw * GOLDEN) >> (64 - PRIORITY_BITS)
    return (u * bound) >> PRIORITY_BITS


def random_sample_py(seed: int, layer: int, neuron: int, corpus_ids: Sequence[int], k: int) -> list[int]:
    """The slow reference: Floyd's algorithm picks min(k, W) of the W corpus positions uniformly without
    replacement; the chosen seq ids are ranked by (priority, seq_id)."""
    ids = sorted(corpus_ids)
    w = len(ids)
    chosen: set[int] = set()
    for j in range(w - min(k, w), w):
        t = uniform_below_py(seed, layer, neuron, j, j + 1)
        chosen.add(j if t in chosen else t)
    return sorted((ids[p] for p in chosen), key=lambda s: (random_priority_py(seed, layer, neuron, s), s))


def neuron_salts(seed: int, layer: int, n_neurons: int, device) -> torch.Tensor:
    """Per-neuron hash salt, as int64 (the two's-complement view of the unsigned value)."""
    return torch.tensor([_signed(neuron_salt_py(seed, layer, n)) for n in range(n_neurons)],
                        dtype=torch.int64, device=device)


def random_priorities(salts: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[N] salts x [B] seq ids -> [N, B] priorities in [0, 2**31)."""
    return _shr(mix64(salts[:, None] + seq_ids[None, :] * _signed(GOLDEN)), 64 - PRIORITY_BITS)


def random_sample(seed: int, layer: int, n_neurons: int, corpus_ids: torch.Tensor, k: int,
                  device="cpu") -> torch.Tensor:
    """[N, min(k, W)] seq ids of every neuron's random records in rank order (= `random_sample_py` per neuron).
    Floyd's algorithm costs O(N k^2), independent of the corpus size W."""
    ids = torch.as_tensor(corpus_ids, dtype=torch.int64).sort().values.to(device)
    w, m = ids.numel(), min(k, ids.numel())
    salts = neuron_salts(seed, layer, n_neurons, device)
    draw_salts = salts ^ _signed(DRAW_TAG)
    chosen = torch.empty(n_neurons, 0, dtype=torch.int64, device=device)
    for j in range(w - m, w):
        u = _shr(mix64(draw_salts + _signed(j * GOLDEN & MASK64)), 64 - PRIORITY_BITS)
        t = (u * (j + 1)) >> PRIORITY_BITS
        taken = (chosen == t[:, None]).any(1)
        chosen = torch.cat([chosen, torch.where(taken, torch.full_like(t, j), t)[:, None]], dim=1)
    seq = ids[chosen]
    keys = pack_keys(-_rank_priorities(salts, seq), seq)
    return seq.gather(1, keys.argsort(dim=1, descending=True))


def _rank_priorities(salts: torch.Tensor, seq: torch.Tensor) -> torch.Tensor:
    """[N] salts, [N, m] seq ids -> [N, m] priorities (each neuron's own windows)."""
    return _shr(mix64(salts[:, None] + seq * _signed(GOLDEN)), 64 - PRIORITY_BITS)


def quantile_bin_bounds(n_windows: int) -> list[tuple[int, int]]:
    """Each quantile bin as positions [start, end) among a neuron's W windows sorted by window max, ascending:
    the window at position p has quantile p / W (the fraction of windows below it), exact in integers."""
    cut = [math.ceil(edge * n_windows) for edge in QUANTILE_EDGES]
    return list(zip(cut[:-1], cut[1:]))


def quantile_priority_py(seed: int, layer: int, neuron: int, seq_id: int) -> int:
    """The pick key of a window within its quantile bin: smaller is picked first (the slow reference)."""
    salt = neuron_salt_py(seed, layer, neuron) ^ QUANTILE_TAG
    return mix64_py(salt + seq_id * GOLDEN) >> (64 - PRIORITY_BITS)


def quantile_picks_py(seed: int, layer: int, neuron: int, seq_ids: Sequence[int], maxima: Sequence[float],
                      n_per_quantile: int) -> list[tuple[int, int]]:
    """The slow reference: (rank, seq_id) of one neuron's quantile records. Windows are ordered by window max,
    ascending, ties by higher seq_id first (the top records' order reversed); each bin keeps its
    `n_per_quantile` windows of smallest (priority, seq_id); rank = bin * n_per_quantile + i."""
    order = sorted(range(len(seq_ids)), key=lambda i: (maxima[i] + 0.0, -seq_ids[i]))
    out = []
    for b, (start, end) in enumerate(quantile_bin_bounds(len(seq_ids))):
        members = [seq_ids[i] for i in order[start:end]]
        chosen = sorted(members, key=lambda s: (quantile_priority_py(seed, layer, neuron, s), s))[:n_per_quantile]
        out += [(b * n_per_quantile + i, s) for i, s in enumerate(chosen)]
    return out


def quantile_picks(seed: int, layer: int, seq_ids: torch.Tensor, maxima: torch.Tensor,
                   n_per_quantile: int) -> torch.Tensor:
    """[W] seq ids and their [W, N] window maxima -> [N, bins * n_per_quantile] picked seq ids, column = rank,
    -1 where a bin has fewer windows (= `quantile_picks_py` per neuron). Memory: a few [N, W] int64."""
    seq_ids = seq_ids.to(torch.int64)
    n_neurons = maxima.shape[1]
    order = pack_keys(float_order_key(maxima.T), seq_ids).argsort(dim=1)  # keys are unique per neuron
    salts = neuron_salts(seed, layer, n_neurons, maxima.device) ^ _signed(QUANTILE_TAG)
    prio = random_priorities(salts, seq_ids.to(maxima.device))
    pick_keys = (prio * (2 ** 32) + seq_ids[None, :].to(prio.device)).gather(1, order)  # smaller is picked first
    out = torch.full((n_neurons, N_QUANTILE_BINS * n_per_quantile), -1, dtype=torch.int64)
    for b, (start, end) in enumerate(quantile_bin_bounds(len(seq_ids))):
        m = min(n_per_quantile, end - start)
        if m:
            chosen = pick_keys[:, start:end].topk(m, dim=1, largest=False, sorted=True).values
            out[:, b * n_per_quantile:b * n_per_quantile + m] = (chosen & LOW_MASK).cpu()
    return out


def float_order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in the int32 range with the same order (-0.0 counts as +0.0)."""
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def pack_keys(primary: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[..., B] primaries with [B] (or same-shape) seq ids -> keys: larger primary first, then lower seq_id."""
    return primary * (2 ** 32) + (LOW_MASK - seq_ids)


def seq_ids_of(keys: torch.Tensor) -> torch.Tensor:
    return LOW_MASK - (keys & LOW_MASK)
