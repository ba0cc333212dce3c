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
"""
from __future__ import annotations

import math
import struct
from collections.abc import Sequence

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


def pick_keys(salts: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[N] quantile salts x [B] seq ids -> [N, B] keys, smaller is picked first: (priority, seq_id) with the sign
    bit flipped, so that every real key is below 0 and `EMPTY` above them all."""
    return random_priorities(salts, seq_ids) * 2 ** 32 + seq_ids[None, :] + INT64_MIN


def bins_of_buckets(counts: torch.Tensor) -> torch.Tensor:
    """[N, N_BUCKETS] counts -> [N, N_BUCKETS] bin of each bucket (-1: none, or an empty bucket): the exact bin
    of the bucket's median position (`quantile_bin_bounds`, in integers)."""
    w = counts.sum(1, keepdim=True)
    before = counts.cumsum(1) - counts
    median = before + (counts - 1).clamp_min(0) // 2
    bins = torch.full_like(counts, -1)
    for b, (lo, hi) in enumerate(zip(QUANTILE_EDGES, QUANTILE_EDGES[1:])):
        start = (lo.numerator * w + lo.denominator - 1) // lo.denominator  # ceil(lo * W)
        end = (hi.numerator * w + hi.denominator - 1) // hi.denominator
        bins = torch.where((median >= start) & (median < end), b, bins)
    return torch.where(counts > 0, bins, -1)


class QuantileSketch:
    """One layer's histogram of window maxima (`counts` [N, N_BUCKETS]) and, per (neuron, bucket), the
    `n_per` smallest pick keys in ascending order (`keys` [N * N_BUCKETS, n_per], `EMPTY` where fewer; so the
    last column is the key a new window must beat)."""

    def __init__(self, n_neurons: int, n_per: int, seed: int, layer: int, device):
        self.n_neurons, self.n_per = n_neurons, n_per
        self.counts = torch.zeros(n_neurons, N_BUCKETS, dtype=torch.int64, device=device)
        self.keys = torch.full((n_neurons * N_BUCKETS, n_per), EMPTY, dtype=torch.int64, device=device)
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
        enter = keys < self.keys[cells, -1]  # a cell with an EMPTY slot takes any key (real keys are < 0)
        if bool(enter.any()):
            self._insert(cells[enter], keys[enter])

    def _insert(self, cells: torch.Tensor, keys: torch.Tensor) -> None:
        """Into each cell, the n_per smallest of its keys and the new ones (one sort for all cells)."""
        touched = torch.unique(cells)
        n = self.n_per
        all_cells = torch.cat([touched.repeat_interleave(n), cells])
        all_keys = torch.cat([self.keys[touched].reshape(-1), keys])
        order = all_keys.argsort()
        order = order[all_cells[order].argsort(stable=True)]  # by cell, then key
        all_cells, all_keys = all_cells[order], all_keys[order]
        rank = torch.arange(len(all_cells), device=cells.device) - torch.searchsorted(all_cells, all_cells)
        keep = rank < n  # every touched cell brings n entries, so exactly n of each are kept, in order
        self.keys[all_cells[keep], rank[keep]] = all_keys[keep]

    def merge(self, other: QuantileSketch) -> None:
        dev = self.counts.device
        self.counts += other.counts.to(dev)
        self.keys = torch.cat([self.keys, other.keys.to(dev)], dim=1).sort(dim=1).values[:, :self.n_per].contiguous()

    def picks(self) -> torch.Tensor:
        """[N, bins * n_per] picked seq ids, column = rank = bin * n_per + i, -1 where a bin has fewer."""
        bins = bins_of_buckets(self.counts)
        keys = self.keys.view(self.n_neurons, N_BUCKETS, self.n_per)
        out = torch.full((self.n_neurons, N_QUANTILE_BINS * self.n_per), -1, dtype=torch.int64)
        for b in range(N_QUANTILE_BINS):
            mine = torch.where((bins == b)[..., None], keys, EMPTY).view(self.n_neurons, -1)
            chosen = mine.topk(min(self.n_per, mine.shape[1]), dim=1, largest=False, sorted=True).values
            out[:, b * self.n_per:(b + 1) * self.n_per] = torch.where(chosen != EMPTY, chosen & LOW_MASK, -1).cpu()
        return out

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
        return {"counts": self.counts, "keys": self.keys}

    def load_state_dict(self, state: dict) -> None:
        dev = self.counts.device
        self.counts, self.keys = state["counts"].to(dev), state["keys"].to(dev)


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
