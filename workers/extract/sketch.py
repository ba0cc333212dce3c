"""Quantile records at any corpus size: a per-neuron histogram of window maxima over fixed log-linear buckets,
with, per (neuron, bucket), the windows of smallest quantile priority; both mergeable, built in the extraction's
single pass (docs/method.md §2).

The exact rule needs every window's maximum (W × N per layer; GPT-2 XL over 10^6 windows: ~614 GB). Here memory
is N × `N_BUCKETS` × (1 + n_per_quantile) int64 per layer (18.5 KB per neuron with 2 per bin), whatever W is.

Buckets. A value's bucket is read off its float32 bits: sign, exponent and the top `MANTISSA_BITS` mantissa
bits (log-linear buckets, as in HdrHistogram), so it is exact integer arithmetic, the same on every device,
and monotone in the value. Magnitudes from 2**`MIN_EXP` to 2**`MAX_EXP` have 2**MANTISSA_BITS buckets per
octave, each of relative width at most 2**-MANTISSA_BITS (6.25 %); magnitudes below 2**MIN_EXP (0.0039) share
one zero bucket; magnitudes from 2**MAX_EXP (65536, above float16's largest finite value) share the outermost
bucket of their sign. The counts are exact; only the position of a value inside its bucket is forgotten.

Bins. A neuron's W windows sorted by maximum ascending give each window a position; the exact bins are the
position ranges of `quantile_bin_bounds`. A bucket covers the positions of the windows in it; it goes whole to
the bin that holds its median position (none when that is at quantile >= 0.999). So a window lands in another
bin than under the exact rule only inside a bucket that straddles a bin edge, that is, with a maximum within
one bucket (relative 6.25 %, or absolute 0.0039 near 0) of the exact edge's value. A bin can come out empty
where one bucket holds most of the windows (a neuron whose maxima are mostly exactly 0).

Picks. Each bin keeps its `n_per_quantile` windows of smallest (priority, seq_id), the priority being keys.py's
quantile hash. Each bucket keeps its own `n_per_quantile` smallest, so the smallest of a union of buckets are
among them: the picks are exact for the bins above. Windows holding a non-finite activation are left out of
the histogram and the picks.

Classifier windows (docs/method.md §2, §6), for the detection, fuzzing and embedding scorers: with the neuron's
maximum M known at the end, a cut c splits the windows into non-activating ones (window max < c) and activating
ones (>= c). c is the highest edge of a band (`band_of`: 2**BAND_BITS buckets each, so band edges are 2**e and
1.5 x 2**e) that is at or below `below` x M, so every non-activating window lies below that fraction of M, and
the cut is within a factor 1.5 of it (none, when `below` x M < 2**MIN_EXP). The activating windows are binned by
the same median rule into `bins` equal quantile bins of their own (deciles by default), each keeping `per_bin`
picks; the non-activating picks are the `n_low` windows of smallest pick key among all the bands below the cut:
a uniform sample of them, exact because each band keeps its own `n_low` smallest (`low_keys`, memory
N x N_BANDS x n_low int64; 20 KB per neuron with 50).
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from fractions import Fraction

import torch

from workers.extract.keys import (
    INT64_MIN,
    LOW_MASK,
    N_QUANTILE_BINS,
    QUANTILE_EDGES,
    QUANTILE_TAG,
    _signed,
    neuron_salts,
    quantile_bin_bounds,
    quantile_priority_py,
    random_priorities,
)

MANTISSA_BITS = 4
MIN_EXP, MAX_EXP = -8, 16
PER_SIGN = ((MAX_EXP - MIN_EXP) << MANTISSA_BITS) + 1  # buckets of each sign, the last from 2**MAX_EXP on
N_BUCKETS = 2 * PER_SIGN + 1
ZERO = PER_SIGN  # the bucket of (-2**MIN_EXP, 2**MIN_EXP)
RELATIVE_WIDTH = 2.0 ** -MANTISSA_BITS
EMPTY = 2 ** 63 - 1  # an unused reservoir slot; real pick keys are below 0 (`pick_keys`)
_FIRST = (127 + MIN_EXP) << MANTISSA_BITS  # the float32 bits of 2**MIN_EXP, shifted as `bucket_of` does
BAND_BITS = MANTISSA_BITS - 1  # a band of the non-activating reservoir: 2**BAND_BITS buckets, half an octave
N_BANDS = 2 + ((PER_SIGN - 1) >> BAND_BITS)  # band 0: every bucket at or below the zero bucket


def bucket_of(v: torch.Tensor) -> torch.Tensor:
    """Float values -> their bucket 0..N_BUCKETS-1 (int64), non-decreasing in the value."""
    v = v.float() + 0.0
    mag = (v.abs().view(torch.int32).to(torch.int64) >> (23 - MANTISSA_BITS)) - _FIRST
    mag = mag.clamp(-1, PER_SIGN - 1)  # -1: below 2**MIN_EXP
    return torch.where(v > 0, ZERO + 1 + mag, ZERO - 1 - mag)


def bucket_of_py(v: float) -> int:
    """The slow reference of `bucket_of`, from the float32's bits."""
    bits = struct.unpack("<I", struct.pack("<f", abs(v)))[0]
    mag = min(max((bits >> (23 - MANTISSA_BITS)) - _FIRST, -1), PER_SIGN - 1)
    return ZERO + 1 + mag if v > 0 else ZERO - 1 - mag


def bucket_bounds(j: int) -> tuple[float, float]:
    """(low, high) of bucket j: it holds low <= v < high above the zero bucket, low < v <= high below it and
    low < v < high in it (the outermost buckets reach to ±inf)."""
    if j == ZERO:
        return -2.0 ** MIN_EXP, 2.0 ** MIN_EXP
    mag = abs(j - ZERO) - 1
    low = 2.0 ** (MIN_EXP + (mag >> MANTISSA_BITS)) * (1 + (mag % (1 << MANTISSA_BITS)) * RELATIVE_WIDTH)
    high = math.inf if mag == PER_SIGN - 1 else low + 2.0 ** (MIN_EXP + (mag >> MANTISSA_BITS)) * RELATIVE_WIDTH
    return (low, high) if j > ZERO else (-high, -low)


def bucket_value(j: int) -> float:
    """The value that stands for bucket j: its midpoint (0 for the zero bucket; the inner edge for the outermost
    ones), within relative RELATIVE_WIDTH / 2 of every value in the bucket but those."""
    low, high = bucket_bounds(j)
    if j == ZERO:
        return 0.0
    if math.isinf(low) or math.isinf(high):
        return high if j < ZERO else low
    return (low + high) / 2


BUCKET_VALUES = torch.tensor([bucket_value(j) for j in range(N_BUCKETS)], dtype=torch.float64)


def band_of(bucket: torch.Tensor) -> torch.Tensor:
    """Buckets -> their band 0..N_BANDS-1: 0 for every bucket at or below the zero bucket (maxima below
    2**MIN_EXP, negative ones included), then one band per 2**BAND_BITS positive buckets."""
    return torch.where(bucket > ZERO, 1 + ((bucket - ZERO - 1) >> BAND_BITS), 0)


def band_first_bucket(band: int) -> int:
    """The lowest bucket of a band (0 for band 0)."""
    return 0 if band == 0 else ZERO + 1 + ((band - 1) << BAND_BITS)


# the upper edge of each band: a window max below it lies in that band or a lower one
BAND_TOPS = torch.tensor([bucket_bounds(band_first_bucket(b + 1))[0] if b + 1 < N_BANDS else math.inf
                          for b in range(N_BANDS)], dtype=torch.float64)


def low_cut(neuron_max: torch.Tensor, below: float) -> torch.Tensor:
    """[N] neuron maxima -> [N] count k of the bands wholly below `below` x max (their tops <= it): bands
    0..k-1 hold the non-activating windows, bucket `band_first_bucket(k)` on the activating ones (k = 0: no
    window counts as non-activating; a NaN or non-positive max gives 0)."""
    limit = below * neuron_max.double().cpu()
    return (BAND_TOPS[None, :] <= limit[:, None]).sum(1).clamp_max(N_BANDS - 1)  # the last band reaches to inf


def _smallest_keys_by_group(keys: torch.Tensor, groups: torch.Tensor, n_groups: int, n: int) -> torch.Tensor:
    """keys [N, C, n_per] (ascending per cell, `EMPTY` where unused), groups [N, C] (-1: none) -> [N, n_groups * n]
    seq ids: per group, the n smallest keys of its cells, -1 where fewer."""
    n_neurons = keys.shape[0]
    out = torch.full((n_neurons, n_groups * n), -1, dtype=torch.int64)
    for g in range(n_groups):
        mine = torch.where((groups == g)[..., None], keys, EMPTY).view(n_neurons, -1)
        m = min(n, mine.shape[1])
        chosen = mine.topk(m, dim=1, largest=False, sorted=True).values
        out[:, g * n:g * n + m] = torch.where(chosen != EMPTY, chosen & LOW_MASK, -1).cpu()
    return out


def pick_keys(salts: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[N] quantile salts x [B] seq ids -> [N, B] keys, smaller is picked first: (priority, seq_id) with the sign
    bit flipped, so that every real key is below 0 and `EMPTY` above them all."""
    return random_priorities(salts, seq_ids) * 2 ** 32 + seq_ids[None, :] + INT64_MIN


def bins_of_buckets(counts: torch.Tensor, edges: Sequence[Fraction] = QUANTILE_EDGES) -> torch.Tensor:
    """[N, N_BUCKETS] counts -> [N, N_BUCKETS] bin of each bucket (-1: none, or an empty bucket): the exact bin
    of the bucket's median position (`quantile_bin_bounds`, in integers), bins between the given `edges`."""
    w = counts.sum(1, keepdim=True)
    before = counts.cumsum(1) - counts
    median = before + (counts - 1).clamp_min(0) // 2
    bins = torch.full_like(counts, -1)
    for b, (lo, hi) in enumerate(zip(edges, edges[1:])):
        start = (lo.numerator * w + lo.denominator - 1) // lo.denominator  # ceil(lo * W)
        end = (hi.numerator * w + hi.denominator - 1) // hi.denominator
        bins = torch.where((median >= start) & (median < end), b, bins)
    return torch.where(counts > 0, bins, -1)


class QuantileSketch:
    """One layer's histogram of window maxima (`counts` [N, N_BUCKETS]) and, per (neuron, bucket), the
    `n_per` smallest pick keys in ascending order (`keys` [N * N_BUCKETS, n_per], `EMPTY` where fewer; so the
    last column is the key a new window must beat). With `n_low`, also per (neuron, band) the `n_low` smallest
    (`low_keys` [N * N_BANDS, n_low]), for the non-activating windows of `classifier_picks`."""

    def __init__(self, n_neurons: int, n_per: int, seed: int, layer: int, device, n_low: int = 0):
        self.n_neurons, self.n_per, self.n_low = n_neurons, n_per, n_low
        self.counts = torch.zeros(n_neurons, N_BUCKETS, dtype=torch.int64, device=device)
        self.keys = torch.full((n_neurons * N_BUCKETS, n_per), EMPTY, dtype=torch.int64, device=device)
        self.low_keys = torch.full((n_neurons * N_BANDS, n_low), EMPTY, dtype=torch.int64, device=device)
        self.salts = neuron_salts(seed, layer, n_neurons, device) ^ _signed(QUANTILE_TAG)
        self._cell_base = torch.arange(n_neurons, device=device) * N_BUCKETS

    def update(self, wmax: torch.Tensor, seq_ids: torch.Tensor, clean: torch.Tensor | None = None) -> None:
        """wmax [B, N] window maxima of windows `seq_ids` [B]; `clean` [B, N]: False for a window that holds a
        non-finite activation (left out)."""
        # neuron-major [N, B]: each neuron's cells lie in its own row of the tables, so the lookups stay in cache
        cells = bucket_of(wmax.T) + self._cell_base[:, None]
        keys = pick_keys(self.salts, seq_ids.to(self.salts.device))
        if clean is not None:
            cells, keys = cells[clean.T], keys[clean.T]
        cells, keys = cells.reshape(-1), keys.reshape(-1)
        self.counts.view(-1).scatter_add_(0, cells, torch.ones_like(cells))
        _offer(self.keys, cells, keys)
        if self.n_low:
            neuron = cells // N_BUCKETS
            _offer(self.low_keys, band_of(cells - neuron * N_BUCKETS) + neuron * N_BANDS, keys)

    def merge(self, other: QuantileSketch) -> None:
        dev = self.counts.device
        self.counts += other.counts.to(dev)
        self.keys = torch.cat([self.keys, other.keys.to(dev)], dim=1).sort(dim=1).values[:, :self.n_per].contiguous()
        self.low_keys = torch.cat([self.low_keys, other.low_keys.to(dev)], dim=1).sort(dim=1) \
            .values[:, :self.n_low].contiguous()

    def picks(self, n_per: int | None = None) -> torch.Tensor:
        """[N, bins * n] picked seq ids (n = `n_per`, at most the sketch's; default the sketch's), column = rank =
        bin * n + i, -1 where a bin has fewer."""
        n = self.n_per if n_per is None else min(n_per, self.n_per)
        keys = self.keys.view(self.n_neurons, N_BUCKETS, self.n_per)[..., :n]
        return _smallest_keys_by_group(keys, bins_of_buckets(self.counts), N_QUANTILE_BINS, n)

    def classifier_picks(self, neuron_max: torch.Tensor, bins: int, per_bin: int, below: float) -> torch.Tensor:
        """[N, bins * per_bin + n_low] seq ids of the classifier windows (module docstring), -1 where fewer:
        column bin * per_bin + i holds the i-th pick of activating bin `bin` (bins of equal count over the windows
        at or above the cut, lowest first), the last n_low columns the non-activating picks. `neuron_max` [N]:
        each neuron's largest finite activation."""
        if per_bin > self.n_per:
            raise ValueError(f"the sketch keeps {self.n_per} windows per bucket, fewer than {per_bin} per bin")
        k = low_cut(neuron_max, below)  # [N] bands below the cut
        first = torch.tensor([band_first_bucket(int(b)) for b in range(N_BANDS)])[k]  # [N] first activating bucket
        counts = self.counts.cpu()
        active = torch.arange(N_BUCKETS)[None, :] >= first[:, None]
        edges = [Fraction(i, bins) for i in range(bins + 1)]
        keys = self.keys.cpu().view(self.n_neurons, N_BUCKETS, self.n_per)[..., :per_bin]
        strat = _smallest_keys_by_group(keys, bins_of_buckets(torch.where(active, counts, 0), edges), bins, per_bin)
        low_groups = torch.where(torch.arange(N_BANDS)[None, :] < k[:, None], 0, -1)
        low = _smallest_keys_by_group(self.low_keys.cpu().view(self.n_neurons, N_BANDS, self.n_low), low_groups, 1,
                                      self.n_low)
        return torch.cat([strat, low], dim=1)

    def quantile_values(self) -> torch.Tensor:
        """[N, 4] float64: the sketch's estimate of the window maximum at quantiles 0.5, 0.9, 0.99, 0.999 (the
        value standing for the bucket of the window at position ceil(q W), `bucket_value`); NaN where that
        position is past the last window."""
        counts = self.counts.cpu()
        w = counts.sum(1, keepdim=True)
        cum = counts.cumsum(1)
        out = torch.full((self.n_neurons, len(QUANTILE_EDGES) - 1), float("nan"), dtype=torch.float64)
        for i, q in enumerate(QUANTILE_EDGES[1:]):
            pos = (q.numerator * w + q.denominator - 1) // q.denominator
            j = torch.searchsorted(cum, pos, right=True).clamp_max(N_BUCKETS - 1)
            out[:, i] = torch.where(pos[:, 0] < w[:, 0], BUCKET_VALUES[j[:, 0]], float("nan"))
        return out

    def state_dict(self) -> dict:
        return {"counts": self.counts, "keys": self.keys, "low_keys": self.low_keys}

    def load_state_dict(self, state: dict) -> None:
        dev = self.counts.device
        self.counts, self.keys = state["counts"].to(dev), state["keys"].to(dev)
        self.low_keys = state["low_keys"].to(dev) if "low_keys" in state else self.low_keys


def _offer(table: torch.Tensor, cells: torch.Tensor, keys: torch.Tensor) -> None:
    """Into each cell (row of `table`, ascending keys, `EMPTY` where unused), the smallest of its keys and the
    new ones."""
    if table.shape[1] == 0:
        return
    enter = keys < table[cells, -1]  # a cell with an EMPTY slot takes any key (real keys are < 0)
    if bool(enter.any()):
        _insert(table, cells[enter], keys[enter])


def _insert(table: torch.Tensor, cells: torch.Tensor, keys: torch.Tensor) -> None:
    """Into each cell, the n smallest of its keys and the new ones: the touched rows, each with its new keys
    appended (padded with `EMPTY` to the most any cell got), sorted along the row in one batched sort. Its cost
    follows the touched rows, not a sort of them all together: the non-activating bands keep 50 keys a cell."""
    n = table.shape[1]
    dev = cells.device
    cells, perm = cells.sort(stable=True)
    touched, counts = torch.unique_consecutive(cells, return_counts=True)
    row = torch.repeat_interleave(torch.arange(len(touched), device=dev), counts)
    rank = torch.arange(len(cells), device=dev) - torch.repeat_interleave(counts.cumsum(0) - counts, counts)
    new = torch.full((len(touched), int(counts.max())), EMPTY, dtype=torch.int64, device=dev)
    new[row, rank] = keys[perm]
    table[touched] = torch.cat([table[touched], new], dim=1).sort(dim=1).values[:, :n]


def sketch_picks_py(seed: int, layer: int, neuron: int, seq_ids: Sequence[int], maxima: Sequence[float],
                    n_per: int) -> list[tuple[int, int]]:
    """The slow reference: (rank, seq_id) of one neuron's quantile records under the sketch's bins, from every
    window's maximum (all finite)."""
    buckets = [bucket_of_py(m) for m in maxima]
    counts = [0] * N_BUCKETS
    for j in buckets:
        counts[j] += 1
    bounds = quantile_bin_bounds(len(seq_ids))
    bin_of, before = {}, 0
    for j, c in enumerate(counts):
        if c:
            median = before + (c - 1) // 2
            bin_of[j] = next((b for b, (lo, hi) in enumerate(bounds) if lo <= median < hi), -1)
        before += c
    out = []
    for b in range(N_QUANTILE_BINS):
        members = [s for s, j in zip(seq_ids, buckets) if bin_of[j] == b]
        chosen = sorted(members, key=lambda s: (quantile_priority_py(seed, layer, neuron, s), s))[:n_per]
        out += [(b * n_per + i, s) for i, s in enumerate(chosen)]
    return out


def classifier_picks_py(seed: int, layer: int, neuron: int, seq_ids: Sequence[int], maxima: Sequence[float],
                        neuron_max: float, bins: int, per_bin: int, n_low: int, below: float) -> list[tuple[int, int]]:
    """The slow reference: (column, seq_id) of one neuron's `classifier_picks`, from every window's maximum (all
    finite)."""
    k = min(sum(1 for t in BAND_TOPS.tolist() if t <= below * neuron_max), N_BANDS - 1)
    cut = band_first_bucket(k)
    buckets = [bucket_of_py(m) for m in maxima]
    active = [(s, j) for s, j in zip(seq_ids, buckets) if j >= cut]
    counts = [0] * N_BUCKETS
    for _, j in active:
        counts[j] += 1
    edges = [math.ceil(Fraction(i, bins) * len(active)) for i in range(bins + 1)]
    bin_of, before = {}, 0
    for j, c in enumerate(counts):
        if c:
            median = before + (c - 1) // 2
            bin_of[j] = next(b for b in range(bins) if edges[b] <= median < edges[b + 1])
        before += c

    def key(s: int) -> tuple[int, int]:
        return quantile_priority_py(seed, layer, neuron, s), s
    out = []
    for b in range(bins):
        chosen = sorted((s for s, j in active if bin_of[j] == b), key=key)[:per_bin]
        out += [(b * per_bin + i, s) for i, s in enumerate(chosen)]
    low = sorted((s for s, j in zip(seq_ids, buckets) if j < cut), key=key)[:n_low]
    return out + [(bins * per_bin + i, s) for i, s in enumerate(low)]
