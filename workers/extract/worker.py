"""Activation extraction: one forward pass per batch feeds per-neuron streaming summaries of every layer.

Everything per neuron is kept as tensors on the model's device and updated for all neurons of a layer at
once (no Python loop over neurons):
- top records: the `top_k` windows with the largest window maximum, ties to the lower seq_id;
- random records: `n_random` windows drawn uniformly without replacement from the run's corpus, independently
  per neuron, by Floyd's algorithm driven by a hash of (seed, layer, neuron, draw). The sample is fixed before
  the first batch (it needs only the corpus' seq ids), so a batch copies just the windows that are in it and
  slices of the corpus merge by union. Records are ranked by a second hash of (seed, layer, neuron, seq_id);
- running mean / variance (Chan's parallel formula, float64), max, count of tokens > 0, token count;
- for quantile records (optional, two passes): every window's maxima, saved per chunk; the picks per quantile
  bin (`quantile_picks`) come from their union, and `ExtractWorker.process_quantiles` re-runs the batches
  holding picked windows.

Top records are ranked by one int64 key: the window max as an order-preserving integer in the high half and
`2**32 - 1 - seq_id` in the low half. Keys are unique per neuron, so "keep the k largest keys" is exact,
tie-breaking included, and a merge of two reservoirs is the reservoir of the union.

Cost, per layer and batch, is what decides the design (the forward of one layer is ~20 ms in bf16 and ~70 ms
in float32 on the 2-core dev CPUs): one fused pass over the [B, T, N] activations (slice by slice on a CPU)
gives every per-window number at once; the top reservoir has spare slots and a per-neuron floor, so a batch
costs a compare plus copies of the few windows above the floor, and the floor (a top-k over the reservoir and
the batch) is recomputed only when a neuron's spare slots run out or a batch floods the reservoir.

No Ray here: `ExtractWorker` (model + collector + checkpoint files in a run store) is what the Ray actor wraps.
"""
from __future__ import annotations

import io
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from fractions import Fraction

import numpy as np
import pyarrow as pa
import torch

from schemas.tables import NEURON_STATS, RECORDS

INT64_MIN = -(2 ** 63)
LOW_MASK = 2 ** 32 - 1
MAX_SEQ_ID = LOW_MASK
MASK64 = 2 ** 64 - 1
MIX1, MIX2, GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15
DRAW_TAG = 0xD1B54A32D192ED03  # separates the draw stream of Floyd's algorithm from the ranking hash
PRIORITY_BITS = 31
PLACEHOLDER_END = INT64_MIN + 2 ** 24  # empty reservoir slots hold distinct keys below this; real keys are above
QUANTILE_TAG = 0x3C6EF372FE94F82B  # separates the quantile picks' hash from the random records' hashes
# quantile bins of the window maxima (SPEC §2): [0, 0.5), [0.5, 0.9), [0.9, 0.99), [0.99, 0.999)
QUANTILE_EDGES = (Fraction(0), Fraction(1, 2), Fraction(9, 10), Fraction(99, 100), Fraction(999, 1000))
N_QUANTILE_BINS = len(QUANTILE_EDGES) - 1

log = logging.getLogger(__name__)


class ExtractError(ValueError):
    """A problem with the extraction inputs, reported as one line."""


# --- keys and hashes (pure functions) -----------------------------------------------------------------------
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


def window_reductions(x: torch.Tensor):
    """[B, T, N] activations -> per-window [B, N] float32: max, sum, sum of squares, count of tokens > 0.
    Every number is a reduction over T only, so that compiled they share one loop over x (a count over
    (B, T) at once was a second full read of x in Inductor's code). Counts are exact in float32 (T < 2**24)."""
    xf = x.float()
    return xf.amax(1), xf.sum(1), (xf * xf).sum(1), (xf > 0).float().sum(1)


def batch_summaries(t: int, wmax, s1, s2, npos_w, seq_ids: torch.Tensor, floor: torch.Tensor):
    """Per-window reductions of a batch of windows of T = `t` tokens -> `window_summaries`' output."""
    s1, s2 = s1.double(), s2.double()
    mean_w = s1 / t
    m2_w = (s2 - s1 * mean_w).clamp_min(0)
    mean_b = mean_w.mean(0)
    m2_b = m2_w.sum(0) + t * (mean_w - mean_b).square().sum(0)
    keys = pack_keys(float_order_key(wmax.T), seq_ids)
    enter = keys >= floor
    return keys, enter, enter.sum(1), wmax, mean_b, m2_b, npos_w.sum(0).to(torch.int64)


def window_summaries(x: torch.Tensor, seq_ids: torch.Tensor, floor: torch.Tensor):
    """[B, T, N] activations -> (top keys [N, B], which of them reach the top reservoir's `floor` [N, 1] and
    how many per neuron, window maxima [B, N] float32, and the batch's moments per neuron: mean, M2 (float64),
    count of tokens > 0). One read of x when compiled (`compiled_summaries`).
    Per-window sums are float32 (T terms) and centred per window before they are combined in float64."""
    return batch_summaries(x.shape[1], *window_reductions(x), seq_ids, floor)


# On a CPU the fused capture computes a batch in slices of about this many bytes of activations, so that the
# reductions read each slice from the core's L2 cache right after the neuron step wrote it (Inductor's CPU code
# runs the step and the reductions as two loops; over a whole batch the second one reads from memory).
CPU_SLICE_BYTES = 2 ** 21


def slice_rows(x: torch.Tensor) -> int:
    """Windows per slice of the fused capture for an input like x [B, T, N] (all of them off a CPU)."""
    if x.device.type != "cpu":
        return x.shape[0]
    return max(1, CPU_SLICE_BYTES // (x.shape[1] * x.shape[2] * x.element_size()))


# Inductor computes a chain of elementwise ops in float32 and rounds once; eager PyTorch rounds after every op.
# Emulating eager's roundings keeps compiled activations equal to the model's own, bit for bit in bf16.
COMPILE_OPTIONS = {"emulate_precision_casts": True}


def compile_or_eager(fn):
    """`fn` compiled by torch.compile (~5-30 s per batch shape), as a callable that falls back to running `fn`
    eagerly, with one warning, where compiling fails (no C compiler, an unsupported device)."""
    try:
        fused = torch.compile(fn, dynamic=False, options=COMPILE_OPTIONS)
    except Exception as e:  # noqa: BLE001 - any failure of the optional fusion means: run eagerly
        _warn_eager(e)
        return fn
    current = [fused]

    def call(*args):
        if current[0] is fn:
            return fn(*args)
        try:
            return current[0](*args)
        except Exception as e:  # noqa: BLE001 - compile errors surface on the first call
            current[0] = fn
            _warn_eager(e)
            return fn(*args)
    return call


def compiled_summaries():
    """`window_summaries` fused into one kernel (for families read through the down projection's pre-hook)."""
    return compile_or_eager(window_summaries)


def fused_capture(kind: str, act: torch.nn.Module, compile: bool):
    """The MLP's neuron step and `window_summaries` as one function: (inputs, seq_ids, floor) -> (activations,
    *summaries). Compiled, the reductions read each activation while it is computed (on a GPU) or while it is
    in cache (on a CPU, slice by slice: `slice_rows`) instead of from memory afterwards, and the step itself is
    one kernel instead of eager's one per op. The slices are unrolled at trace time (the shapes are static)."""
    from workers.models.loading import elementwise_of

    elementwise = elementwise_of(kind, act)

    def capture(inputs, seq_ids, floor):
        b = inputs[0].shape[0]
        rows = slice_rows(inputs[0]) if compile else b
        hs = [elementwise(*(t[i:i + rows] for t in inputs)) for i in range(0, b, rows)]
        h, reductions = _cat(hs), [_cat(list(r)) for r in zip(*map(window_reductions, hs))]
        return (h, *batch_summaries(h.shape[1], *reductions, seq_ids, floor))
    return compile_or_eager(capture) if compile else capture


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _warn_eager(error: Exception) -> None:
    first = (str(error).strip().splitlines() or [""])[0][:200]
    log.warning("torch.compile of the per-window reductions failed (%s: %s); running them eagerly",
                type(error).__name__, first)


# --- reservoirs and stats -------------------------------------------------------------------------------------
def copy_windows(dest: torch.Tensor, flat: torch.Tensor, x: torch.Tensor, neuron: torch.Tensor,
                 window: torch.Tensor) -> None:
    """dest [N, slots, T], as rows: row flat[i] <- x[window[i], :, neuron[i]] (x is a batch's [B, T, N])."""
    dest.view(-1, dest.shape[2]).index_copy_(0, flat, x.permute(2, 0, 1)[neuron, window].to(dest.dtype))


def placeholder_keys(n: int, c: int, device) -> torch.Tensor:
    return (INT64_MIN + torch.arange(c, device=device, dtype=torch.int64)).expand(n, c).clone()


class TopReservoir:
    """Per neuron, the k windows with the largest keys and their per-token activations.

    `capacity` slots per neuron (k plus spares) and a per-neuron `floor`: every key >= floor is live, and the
    k largest live keys are the k largest keys offered so far. A window enters iff its key >= floor, into a
    free slot (key < floor) popped from the neuron's stack of free slots. When a neuron has too few free slots,
    or the batch would bring in more than `FLOOD` windows per neuron on average (the first batches of a run),
    every neuron's floor is raised to the k-th largest key among its slots and the batch (a sort over the
    slots, a top-k over the slots' k largest and the batch): then exactly the windows that belong to the top k
    so far enter, and they always fit, as k - (live slots) of them enter and spare + that many slots are free.
    After the first batches a raise is rare, so a batch costs a compare and copies of the windows above the
    floor. The copies go by flat indices into contiguous rows: on a CPU the per-entry cost is what a batch
    pays, most of it in the first batches, which is why a flood raises the floor first."""

    FLOOD = 4

    def __init__(self, n_neurons: int, k: int, seq_len: int, dtype: torch.dtype, device, spare: int | None = None):
        self.k = k
        self.capacity = k + (max(k, 32) if spare is None else spare) if k else 0
        self.keys = placeholder_keys(n_neurons, self.capacity, device)
        self.acts = torch.zeros(n_neurons, self.capacity, seq_len, dtype=dtype, device=device)
        self.floor = torch.full((n_neurons, 1), INT64_MIN + self.capacity, dtype=torch.int64, device=device)
        self._rebuild_free()

    def _rebuild_free(self) -> None:
        """Free slots first, in each row of `free_slots`; `n_free` of them per neuron."""
        self.free_slots = self.keys.argsort(dim=1)  # ascending: the keys below the floor come first
        self.n_free = (self.keys < self.floor).sum(1)

    def offer(self, cand: torch.Tensor, x: torch.Tensor, enter: torch.Tensor | None = None,
              n_enter: torch.Tensor | None = None) -> None:
        """cand [N, B] keys of this batch's windows; x [B, T, N] their activations; `enter` (= cand >= floor)
        and its row sums when the caller computed them already (fused into `window_summaries`)."""
        if self.k == 0:
            return
        if enter is None:
            enter = cand >= self.floor
            n_enter = enter.sum(1)
        if not bool(n_enter.any()):
            return
        if bool((n_enter > self.n_free).any()) or int(n_enter.sum()) > self.FLOOD * cand.shape[0]:
            self._raise_floor(cand)
            enter = cand >= self.floor
            n_enter = enter.sum(1)
        enter_n, enter_b = enter.nonzero(as_tuple=True)  # row-major
        # the i-th of all entering windows, the j-th of its neuron n, takes the free slot at stack position
        # n_free[n] - 1 - j = (n_free[n] - 1 + (index of n's first entering window)) - i
        top = self.n_free - 1 + (n_enter.cumsum(0) - n_enter)
        pos = top[enter_n] - torch.arange(enter_n.numel(), device=enter_n.device)
        row = enter_n * self.capacity
        flat = row + self.free_slots.view(-1)[row + pos]  # into keys / acts viewed as [N * capacity, ...]
        self.n_free -= n_enter
        self.keys.view(-1)[flat] = cand[enter_n, enter_b]
        copy_windows(self.acts, flat, x, enter_n, enter_b)

    def _raise_floor(self, cand: torch.Tensor) -> None:
        """Every neuron's floor up to its k-th largest key among the slots and the batch's `cand`, from one
        sort that also orders the free slots."""
        keys, order = self.keys.sort(dim=1)
        kth = torch.cat([keys[:, -self.k:], cand], dim=1).topk(self.k, dim=1, sorted=False).values.amin(1, True)
        self.floor = torch.maximum(self.floor, kth)
        self.free_slots = order
        self.n_free = (keys < self.floor).sum(1)

    def sorted(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys [N, k], acts [N, k, T]) largest key first, and how many are real windows."""
        if self.k == 0:
            return self.keys[:, :0], self.acts[:, :0], 0
        keys, idx = self.keys.topk(self.k, dim=1)
        acts = self.acts.gather(1, idx[..., None].expand(-1, -1, self.acts.shape[2]))
        filled = int((keys[0] >= PLACEHOLDER_END).sum()) if keys.numel() else 0
        return keys, acts, filled

    def merge(self, other: "TopReservoir") -> None:
        if self.k == 0:
            return
        dev = self.keys.device
        (ka, aa, _), (kb, ab, _) = self.sorted(), other.sorted()
        keys = torch.cat([ka, kb.to(dev)], dim=1)
        acts = torch.cat([aa, ab.to(dev, self.acts.dtype)], dim=1)
        top, idx = keys.topk(self.k, dim=1)
        real = top >= PLACEHOLDER_END
        self.keys = placeholder_keys(keys.shape[0], self.capacity, dev)
        self.keys[:, :self.k] = torch.where(real, top, self.keys[:, :self.k])  # keys stay unique
        self.acts = torch.zeros_like(self.acts)
        self.acts[:, :self.k] = acts.gather(1, idx[..., None].expand(-1, -1, acts.shape[2]))
        self.floor = torch.where(real[:, -1:], top[:, -1:], self.floor.new_full((1, 1), INT64_MIN + self.capacity))
        self._rebuild_free()

    def state_dict(self) -> dict:
        return {"keys": self.keys, "acts": self.acts, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        dev = self.keys.device
        self.keys, self.floor = state["keys"].to(dev), state["floor"].to(dev)
        self.acts = state["acts"].to(dev, self.acts.dtype)
        self._rebuild_free()


class RandomRecords:
    """Per neuron, the per-token activations of its pre-drawn random windows (`random_sample`)."""

    def __init__(self, sample: torch.Tensor, seq_len: int, dtype: torch.dtype, device):
        self.seq = sample.to(device)  # [N, m] seq ids in rank order
        n, m = self.seq.shape
        self.acts = torch.zeros(n, m, seq_len, dtype=dtype, device=device)
        self.filled = torch.zeros(n, m, dtype=torch.bool, device=device)

    def fill(self, n: torch.Tensor, r: torch.Tensor, b: torch.Tensor, x: torch.Tensor) -> None:
        """Record x[b, :, n] as random record r of neuron n (for each triple)."""
        flat = n * self.seq.shape[1] + r
        copy_windows(self.acts, flat, x, n, b)
        self.filled.view(-1)[flat] = True

    def merge(self, other: "RandomRecords") -> None:
        dev = self.seq.device
        if not torch.equal(self.seq, other.seq.to(dev)):
            raise ExtractError("cannot merge random records drawn for different corpora or seeds")
        of = other.filled.to(dev)
        if bool((self.filled & of).any()):
            raise ExtractError("a window's random record was recorded twice (overlapping corpus slices)")
        self.acts = torch.where(of[..., None], other.acts.to(dev, self.acts.dtype), self.acts)
        self.filled |= of

    def state_dict(self) -> dict:
        return {"seq": self.seq, "acts": self.acts, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        dev = self.seq.device
        if not torch.equal(self.seq, state["seq"].to(dev)):
            raise ExtractError("checkpoint's random sample differs from this run's (other corpus or seed)")
        self.acts, self.filled = state["acts"].to(dev, self.acts.dtype), state["filled"].to(dev)


class RunningStats:
    """Mergeable per-neuron moments: token count, mean and M2 (float64), max, count of tokens > 0."""

    def __init__(self, n_neurons: int, device):
        self.n = 0
        self.mean = torch.zeros(n_neurons, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_neurons, dtype=torch.float64, device=device)
        self.max = torch.full((n_neurons,), float("-inf"), dtype=torch.float32, device=device)
        self.n_pos = torch.zeros(n_neurons, dtype=torch.int64, device=device)

    def update(self, n_tokens: int, mean_b, m2_b, npos, bmax) -> None:
        """One batch's moments (from `window_summaries`)."""
        self._combine(n_tokens, mean_b, m2_b)
        self.max = torch.maximum(self.max, bmax)
        self.n_pos += npos

    def _combine(self, n_b: int, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        n_a, n = self.n, self.n + n_b
        if n == 0:
            return
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)
        self.n = n

    def merge(self, other: "RunningStats") -> None:
        dev = self.mean.device
        self._combine(other.n, other.mean.to(dev), other.m2.to(dev))
        self.max = torch.maximum(self.max, other.max.to(dev))
        self.n_pos = self.n_pos + other.n_pos.to(dev)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divided by the token count)."""
        return self.m2 / max(self.n, 1)

    def state_dict(self) -> dict:
        return {"n": self.n, "mean": self.mean, "m2": self.m2, "max": self.max, "n_pos": self.n_pos}

    def load_state_dict(self, s: dict) -> None:
        dev = self.mean.device
        self.n = int(s["n"])
        self.mean, self.m2 = s["mean"].to(dev), s["m2"].to(dev)
        self.max, self.n_pos = s["max"].to(dev), s["n_pos"].to(dev)


class LayerCollector:
    """All streaming summaries of one layer's neurons."""

    def __init__(self, layer: int, spec: "CollectorSpec", dtype: torch.dtype, device):
        self.layer, self.n_neurons, self.seq_len = layer, spec.n_neurons, spec.seq_len
        self.top = TopReservoir(spec.n_neurons, spec.top_k, spec.seq_len, dtype, device)
        sample = random_sample(spec.seed, layer, spec.n_neurons, spec.corpus_tensor(), spec.n_random, device)
        self.random = RandomRecords(sample, spec.seq_len, dtype, device)
        self.stats = RunningStats(spec.n_neurons, device)
        self.keep_maxima = spec.keep_maxima
        self.maxima: list[tuple[torch.Tensor, torch.Tensor]] = []  # (seq ids, window maxima [B, N]) since taken

    def update(self, x: torch.Tensor, seq_ids: torch.Tensor, summarize=window_summaries, random_hits=None,
               summaries: Sequence[torch.Tensor] | None = None) -> None:
        """x [B, T, N]: this layer's neuron activations on a batch of windows with the given seq ids.
        `random_hits`: (neuron, rank, batch index) of this layer's random records in the batch (looked up by
        `ActivationCollector` for all layers at once). `summaries`: `window_summaries` of x against this layer's
        floor, when the caller computed them already (fused into the MLP's forward)."""
        if x.shape[1:] != (self.seq_len, self.n_neurons):
            raise ExtractError(f"layer {self.layer}: activations of shape {tuple(x.shape)}, expected "
                               f"[batch, {self.seq_len}, {self.n_neurons}]")
        if summaries is None:
            summaries = summarize(x, seq_ids, self.top.floor)
        keys, enter, n_enter, wmax, mean_b, m2_b, npos = summaries
        self.stats.update(x.shape[0] * x.shape[1], mean_b, m2_b, npos, wmax.amax(0))
        self.top.offer(keys, x, enter, n_enter)
        if random_hits is not None and random_hits[0].numel():
            self.random.fill(*random_hits, x)
        if self.keep_maxima:
            self.maxima.append((seq_ids.cpu(), wmax.to(x.dtype).cpu()))

    def take_maxima(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(seq ids [W], window maxima [W, N]) of the windows seen since the last call."""
        if not self.maxima:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, self.n_neurons)
        seq, wmax = (torch.cat(t) for t in zip(*self.maxima))
        self.maxima = []
        return seq, wmax

    def merge(self, other: "LayerCollector") -> None:
        self.top.merge(other.top)
        self.random.merge(other.random)
        self.stats.merge(other.stats)

    def state_dict(self) -> dict:
        return {"top": self.top.state_dict(), "random": self.random.state_dict(), "stats": self.stats.state_dict()}

    def load_state_dict(self, s: dict) -> None:
        self.top.load_state_dict(s["top"])
        self.random.load_state_dict(s["random"])
        self.stats.load_state_dict(s["stats"])

    # --- output tables ---------------------------------------------------------------------------------------
    def records_table(self, extra: dict | None = None) -> pa.Table:
        """Rows sorted by neuron, then kind (top, random, quantile), then rank. `extra`: quantile rows as
        {"neuron", "rank", "seq_id", "acts"} arrays (from `quantile_rows`)."""
        parts = [(kind, p) for kind, p in (("top", self._top_rows()), ("random", self._random_rows()),
                                            ("quantile", extra)) if p is not None and len(p["neuron"])]
        if not parts:
            return RECORDS.empty_table()
        neuron = np.concatenate([p["neuron"] for _, p in parts])
        order = np.argsort(neuron, kind="stable")  # each part is neuron-major already; stable keeps kind, rank
        acts = np.concatenate([p["acts"] for _, p in parts])[order]
        n_rows, t = acts.shape
        values = pa.array(acts.reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(0, n_rows * t + 1, t, dtype=np.int32))
        kinds = np.concatenate([np.full(len(p["neuron"]), kind, dtype=object) for kind, p in parts])
        return pa.Table.from_arrays([
            pa.array(np.full(n_rows, self.layer, dtype=np.int16)),
            pa.array(neuron[order].astype(np.int32)),
            pa.array(kinds[order].tolist(), type=pa.string()),
            pa.array(np.concatenate([p["rank"] for _, p in parts])[order].astype(np.int16)),
            pa.array(np.concatenate([p["seq_id"] for _, p in parts])[order].astype(np.int64)),
            pa.ListArray.from_arrays(offsets, values),
            pa.array(acts.max(axis=1).astype(np.float32)),
        ], schema=RECORDS)

    def _top_rows(self) -> dict | None:
        keys, acts, filled = self.top.sorted()
        if filled == 0:
            return None
        keys, acts = keys[:, :filled].cpu(), acts[:, :filled].float().cpu().numpy()
        return _rows(seq_ids_of(keys).numpy(), acts)

    def _random_rows(self) -> dict | None:
        if self.random.seq.shape[1] == 0:
            return None
        if not bool(self.random.filled.all()):
            missing = int((~self.random.filled).sum())
            raise ExtractError(f"layer {self.layer}: {missing} random records were never seen (the collector "
                               f"did not cover its whole corpus)")
        return _rows(self.random.seq.cpu().numpy(), self.random.acts.float().cpu().numpy())

    def stats_table(self) -> pa.Table:
        s = self.stats
        n = self.n_neurons
        return pa.Table.from_arrays([
            pa.array(np.full(n, self.layer, dtype=np.int16)), pa.array(np.arange(n, dtype=np.int32)),
            pa.array(s.mean.cpu().numpy()), pa.array(s.variance.cpu().numpy()),
            pa.array(s.max.cpu().numpy()),
            pa.array((s.n_pos.double() / max(s.n, 1)).cpu().numpy()),
            pa.array(np.full(n, s.n, dtype=np.int64)),
        ], schema=NEURON_STATS)


def _rows(seq: np.ndarray, acts: np.ndarray) -> dict:
    """[N, m] seq ids and [N, m, T] activations -> neuron-major row arrays with rank 0..m-1."""
    n, m = seq.shape
    return {"neuron": np.repeat(np.arange(n), m), "rank": np.tile(np.arange(m), n),
            "seq_id": seq.reshape(-1), "acts": acts.reshape(n * m, -1)}


@dataclass
class CollectorSpec:
    """What to collect; the same spec on every actor makes their collectors mergeable.

    `corpus`: the seq ids of every window of the run (all actors together); random records are drawn from
    it before the first batch. `keep_maxima`: also keep every window's maxima (for quantile records)."""
    layers: list[int]
    n_neurons: int
    seq_len: int
    top_k: int
    n_random: int
    seed: int
    corpus: Sequence[int] = ()
    keep_maxima: bool = False

    def corpus_tensor(self) -> torch.Tensor:
        c = self.corpus
        if isinstance(c, range) and c.step == 1:
            return torch.arange(c.start, c.stop, dtype=torch.int64)
        return torch.as_tensor(list(c) if not isinstance(c, torch.Tensor) else c, dtype=torch.int64)


class ActivationCollector:
    """Summaries of every requested layer, plus which corpus chunks they cover."""

    def __init__(self, spec: CollectorSpec, *, dtype: torch.dtype = torch.float32, device="cpu",
                 summarize=window_summaries):
        if spec.n_random and len(spec.corpus) == 0:
            raise ExtractError("random records need the corpus' seq ids (CollectorSpec.corpus)")
        self.spec = spec
        self.summarize = summarize
        self.layers = {layer: LayerCollector(layer, spec, dtype, device) for layer in spec.layers}
        self.done_chunks: set[int] = set()
        self.n_windows = 0
        self._hits_for: torch.Tensor | None = None
        self._hits: dict[int, tuple] = {}
        self._index: tuple | None = None

    def update(self, layer: int, x: torch.Tensor, seq_ids: torch.Tensor,
               summaries: Sequence[torch.Tensor] | None = None) -> None:
        if seq_ids is not self._hits_for:
            self._hits, self._hits_for = self._random_hits(seq_ids), seq_ids
        self.layers[layer].update(x, seq_ids, self.summarize, self._hits.get(layer), summaries)

    def floor(self, layer: int) -> torch.Tensor:
        """[N, 1]: the top reservoir's entry floor of a layer (an input of `window_summaries`)."""
        return self.layers[layer].top.floor

    def _random_hits(self, seq_ids: torch.Tensor) -> dict[int, tuple]:
        """Every layer's random records that fall in this batch, found with one lookup for all layers."""
        if self.spec.n_random == 0 or not self.layers:
            return {}
        if self._index is None:
            samples = [c.random.seq.reshape(-1) for c in self.layers.values()]
            by_seq, slot = torch.cat(samples).sort()
            self._index = (by_seq, slot, samples[0].numel())
        by_seq, slot, per_layer = self._index
        batch_seq, batch_pos = seq_ids.to(by_seq.device).sort()
        lo = int(torch.searchsorted(by_seq, batch_seq[:1]))
        hi = int(torch.searchsorted(by_seq, batch_seq[-1:], right=True))
        want, where = by_seq[lo:hi], slot[lo:hi]
        at = torch.searchsorted(batch_seq, want).clamp_max(len(batch_seq) - 1)
        hit = batch_seq[at] == want
        where, b = where[hit], batch_pos[at[hit]]
        where, order = where.sort()  # slots are layer-major: this groups the hits by layer
        b = b[order]
        m = self.spec_random_count()
        n, r = (where % per_layer) // m, where % m
        counts = torch.bincount(where // per_layer, minlength=len(self.layers)).tolist()
        return {layer: hits for layer, hits in zip(self.layers, zip(n.split(counts), r.split(counts), b.split(counts)))}

    def spec_random_count(self) -> int:
        return next(iter(self.layers.values())).random.seq.shape[1]

    def merge(self, other: "ActivationCollector") -> None:
        overlap = self.done_chunks & other.done_chunks
        if overlap:
            raise ExtractError(f"cannot merge collectors that both cover chunks {sorted(overlap)[:5]}")
        for layer, c in self.layers.items():
            c.merge(other.layers[layer])
        self.done_chunks |= other.done_chunks
        self.n_windows += other.n_windows

    def state_dict(self) -> dict:
        return {"done_chunks": sorted(self.done_chunks), "n_windows": self.n_windows,
                "layers": {layer: c.state_dict() for layer, c in self.layers.items()}}

    def load_state_dict(self, s: dict) -> None:
        self.done_chunks = set(s["done_chunks"])
        self.n_windows = int(s["n_windows"])
        for layer, c in self.layers.items():
            c.load_state_dict(s["layers"][layer])


# --- the forward pass ----------------------------------------------------------------------------------------
class _StopForward(Exception):
    """Raised after the last requested layer: the rest of the model is not needed."""


class ActivationExtractor:
    """Runs the subject model's trunk on batches and feeds every requested layer's neuron activations to a
    collector, from one forward pass. The LM head and the layers after the last requested one are skipped.

    Where the family's MLP shape is known (`workers.models.mlp_split`), a requested layer's MLP forward is
    replaced, while the extractor is open, by the same computation with the neuron step and the per-window
    reductions fused into one function (`fused_capture`, compiled when `compile`); other families are read
    through a forward pre-hook on the down projection. `captures`: a dict shared between extractors over the
    same model, so that a second extractor reuses the first one's compiled functions."""

    def __init__(self, loaded, collector, compile: bool = False, captures: dict | None = None):
        self.loaded = loaded
        self.collector = collector
        self.trunk = loaded.model.base_model
        self.device = next(loaded.model.parameters()).device
        self._seq_ids: torch.Tensor | None = None
        self._hooks, self._patched = [], []
        captures = {} if captures is None else captures
        last = max(collector.layers)
        for layer in collector.layers:
            split = loaded.mlp_split(layer)
            if split is None:
                self._hooks.append(loaded.down_proj(layer).register_forward_pre_hook(self._hook(layer, layer == last)))
                continue
            key = (split.kind, type(split.act), repr(split.act), compile)
            if key not in captures:
                captures[key] = fused_capture(split.kind, split.act, compile)
            # an open extractor's forward may be there already: it stays underneath, and comes back at close
            self._patched.append((split.module, split.module.__dict__.get("forward")))
            split.module.forward = self._fused_forward(layer, split, captures[key], layer == last)

    def _hook(self, layer: int, last: bool):
        def hook(module, args):
            if self._seq_ids is None:  # a forward not started by run_batch: not ours to record
                return
            self.collector.update(layer, args[0], self._seq_ids)
            if last:
                raise _StopForward
        return hook

    def _fused_forward(self, layer: int, split, capture, last: bool):
        original = split.module.forward

        def forward(x):
            if self._seq_ids is None:
                return original(x)
            h, *summaries = capture(split.inputs(x), self._seq_ids, self.collector.floor(layer))
            self.collector.update(layer, h, self._seq_ids, summaries)
            if last:
                raise _StopForward
            return split.output(h)
        return forward

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        for module, previous in reversed(self._patched):
            if previous is None:
                del module.forward
            else:
                module.forward = previous
        self._hooks, self._patched = [], []

    @torch.no_grad()
    def run_batch(self, token_ids: torch.Tensor, seq_ids: torch.Tensor) -> None:
        if int(seq_ids.max()) > MAX_SEQ_ID or int(seq_ids.min()) < 0:
            raise ExtractError(f"seq_id out of the supported range 0..{MAX_SEQ_ID}")
        self._seq_ids = seq_ids.to(self.device, torch.int64)
        try:
            self.trunk(input_ids=token_ids.to(self.device), use_cache=False)
        except _StopForward:
            pass
        finally:
            self._seq_ids = None
        self.collector.n_windows += token_ids.shape[0]

    def run(self, token_ids: torch.Tensor, seq_ids: torch.Tensor, batch_size: int) -> None:
        for i in range(0, token_ids.shape[0], batch_size):
            self.run_batch(token_ids[i:i + batch_size], seq_ids[i:i + batch_size])


class LayerCapture:
    """Stands in for a collector in `ActivationExtractor`: keeps each hooked layer's activations of the last
    batch (the quantile pass copies a few windows out of them)."""

    def __init__(self, layers: Iterable[int], n_neurons: int, device="cpu"):
        self.layers = dict.fromkeys(layers)
        self.acts: dict[int, torch.Tensor] = {}
        self.n_windows = 0
        self._floor = torch.full((n_neurons, 1), INT64_MIN, dtype=torch.int64, device=device)

    def update(self, layer: int, x: torch.Tensor, seq_ids: torch.Tensor, summaries=None) -> None:
        self.acts[layer] = x

    def floor(self, layer: int) -> torch.Tensor:
        """The same shape as a collector's, so a compiled capture is reused rather than compiled anew."""
        return self._floor


def wants_compile(spec: CollectorSpec, device) -> bool:
    """Fuse the per-window reductions with torch.compile where it pays: a GPU, or a real-sized model on a CPU
    (the compile takes seconds; the tiny test models run eagerly)."""
    return torch.device(device).type == "cuda" or spec.n_neurons * len(spec.layers) >= 8192


# --- a worker that owns a model, processes chunks and checkpoints (wrapped by the Ray actor) -----------------
def checkpoint_dir(slot: int) -> str:
    return f"_extract/state/slot-{slot:03d}"


def save_collector(store, slot: int, collector: ActivationCollector) -> None:
    """One file per layer under a fresh generation folder, then the head document that points at it (the
    commit point), then the old generation is removed. A crash at any moment leaves a readable checkpoint."""
    base = checkpoint_dir(slot)
    gen = collector.n_windows
    head_old = read_head(store, slot)
    for layer, c in collector.layers.items():
        store.write_bytes(f"{base}/gen-{gen}/layer-{layer}.pt", tensor_bytes(c.state_dict()))
    store.write_json(f"{base}/head.json", {"gen": gen, "done_chunks": sorted(collector.done_chunks),
                                           "n_windows": collector.n_windows})
    if head_old is not None and head_old["gen"] != gen:
        try:
            store.fs.delete_dir(store.path(f"{base}/gen-{head_old['gen']}"))
        except (FileNotFoundError, OSError):
            pass  # a leftover folder is harmless: only the head's generation is ever read


def read_head(store, slot: int) -> dict | None:
    rel = f"{checkpoint_dir(slot)}/head.json"
    return store.read_json(rel) if store.exists(rel) else None


def load_collector(store, slot: int, collector: ActivationCollector, layers: Iterable[int] | None = None) -> bool:
    """Fill `collector` from the slot's checkpoint; False when there is none."""
    head = read_head(store, slot)
    if head is None:
        return False
    collector.done_chunks = set(head["done_chunks"])
    collector.n_windows = int(head["n_windows"])
    for layer in (collector.layers if layers is None else layers):
        state = tensor_load(read_bytes(store, f"{checkpoint_dir(slot)}/gen-{head['gen']}/layer-{layer}.pt"))
        collector.layers[layer].load_state_dict(state)
    return True


def maxima_file(chunk: int, layer: int) -> str:
    """Window maxima of one chunk and layer (quantile records only): {"seq_id": [w], "maxima": [w, N]}."""
    return f"_extract/maxima/chunk-{chunk:05d}/layer-{layer:03d}.pt"


QUANTILE_PICKS = "_extract/quantile/picks.pt"


def quantile_chunk_dir(chunk: int) -> str:
    """The quantile pass's output for one chunk: layer-LLL.pt rows, then done.json."""
    return f"_extract/quantile/chunk-{chunk:05d}"


def load_layer_maxima(store, layer: int, chunks: Iterable[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(seq ids [W], window maxima [W, N]) of one layer over the given chunks (their union is exact)."""
    parts = [tensor_load(read_bytes(store, maxima_file(c, layer))) for c in chunks]
    return torch.cat([p["seq_id"] for p in parts]), torch.cat([p["maxima"] for p in parts])


def picks_in_chunk(picks: torch.Tensor, seq_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[N, R] picked seq ids (-1: none) and a chunk's [w] seq ids -> (neuron, rank, seq_id, position in the
    chunk) of every pick that falls in the chunk."""
    hit = torch.isin(picks, seq_ids)
    neuron, rank = hit.nonzero(as_tuple=True)
    seq = picks[neuron, rank]
    by_seq, perm = seq_ids.sort()
    return neuron, rank, seq, perm[torch.searchsorted(by_seq, seq)]


def tensor_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tensor_load(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_bytes(store, rel: str) -> bytes:
    with store.fs.open_input_stream(store.path(rel)) as f:
        return f.read()


def sequences_part(chunk: int) -> str:
    return f"part-{chunk:05d}"


def read_chunk(store, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token ids [n, T], seq ids [n]) of one corpus chunk, from the run's sequences table."""
    import pyarrow.parquet as pq

    with store.fs.open_input_file(store.path(f"sequences/{sequences_part(chunk)}.parquet")) as f:
        t = pq.read_table(f, columns=["seq_id", "token_ids"])
    seq_ids = torch.from_numpy(t.column("seq_id").to_numpy().astype(np.int64))
    flat = t.column("token_ids").combine_chunks().flatten().to_numpy().astype(np.int64)
    return torch.from_numpy(flat.reshape(len(seq_ids), -1)), seq_ids


@dataclass
class ChunkResult:
    chunk: int
    windows: int
    tokens: int
    seconds: float
    skipped: bool = False


@dataclass
class ExtractWorker:
    """Owns one subject model and one collector; processes chunks and checkpoints after each.

    A restarted worker (same slot) reloads its checkpoint, and a chunk it already covers is skipped, so
    at-least-once delivery of `process` calls still counts every window exactly once."""
    model_name: str
    spec: CollectorSpec
    store: object
    slot: int
    batch_size: int = 32
    dtype: str = "auto"
    device: str = "auto"
    compile: bool | None = None  # None: `wants_compile`
    loaded: object = field(default=None, repr=False)
    _picks: dict | None = field(default=None, init=False, repr=False)
    _captures: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self):
        from workers.models.loading import load_subject

        if self.loaded is None:
            self.loaded = load_subject(self.model_name, dtype=self.dtype, device=self.device)
        param = next(self.loaded.model.parameters())
        if self.compile is None:
            self.compile = wants_compile(self.spec, param.device)
        summarize = compiled_summaries() if self.compile else window_summaries
        self.collector = ActivationCollector(self.spec, dtype=param.dtype, device=param.device, summarize=summarize)
        load_collector(self.store, self.slot, self.collector)
        self.extractor = ActivationExtractor(self.loaded, self.collector, self.compile, self._captures)

    def done_chunks(self) -> list[int]:
        return sorted(self.collector.done_chunks)

    def process(self, chunk: int) -> ChunkResult:
        if chunk in self.collector.done_chunks:
            return ChunkResult(chunk, 0, 0, 0.0, skipped=True)
        t0 = time.perf_counter()
        token_ids, seq_ids = read_chunk(self.store, chunk)
        for c in self.collector.layers.values():
            c.take_maxima()  # a chunk retried in this process starts with none
        self.extractor.run(token_ids, seq_ids, self.batch_size)
        if self.spec.keep_maxima:  # written before the checkpoint that marks the chunk done
            for layer, c in self.collector.layers.items():
                seq, wmax = c.take_maxima()
                self.store.write_bytes(maxima_file(chunk, layer), tensor_bytes({"seq_id": seq, "maxima": wmax}))
        self.collector.done_chunks.add(chunk)
        save_collector(self.store, self.slot, self.collector)
        return ChunkResult(chunk, len(seq_ids), token_ids.numel(), time.perf_counter() - t0)

    def process_quantiles(self, chunk: int) -> ChunkResult:
        """The quantile pass over one chunk: re-run only the batches holding a picked window (`QUANTILE_PICKS`),
        cut exactly as in the first pass, so the activations equal the first pass's bit for bit; write the
        picked windows' activations per layer, then `done.json`."""
        out = quantile_chunk_dir(chunk)
        if self.store.exists(f"{out}/done.json"):
            return ChunkResult(chunk, 0, 0, 0.0, skipped=True)
        t0 = time.perf_counter()
        if self._picks is None:
            self._picks = tensor_load(read_bytes(self.store, QUANTILE_PICKS))["picks"]
        token_ids, seq_ids = read_chunk(self.store, chunk)
        wanted = {layer: picks_in_chunk(p, seq_ids) for layer, p in self._picks.items()}
        acts = {layer: torch.zeros(len(w[0]), self.spec.seq_len) for layer, w in wanted.items()}
        bs = self.batch_size
        batches = sorted({int(b) for w in wanted.values() for b in (w[3] // bs).tolist()})
        # the first pass's computation (same fused or hooked path, same compiled functions), so bit-equal output
        capture = LayerCapture(self._picks, self.spec.n_neurons, next(self.loaded.model.parameters()).device)
        extractor = ActivationExtractor(self.loaded, capture, self.compile, self._captures)
        try:
            for b in batches:
                lo = b * bs
                extractor.run_batch(token_ids[lo:lo + bs], seq_ids[lo:lo + bs])
                for layer, (neuron, _, _, pos) in wanted.items():
                    sel = (pos // bs == b).nonzero(as_tuple=True)[0]
                    x = capture.acts[layer]
                    acts[layer][sel] = x[(pos[sel] - lo).to(x.device), :, neuron[sel].to(x.device)].float().cpu()
        finally:
            extractor.close()
        for layer, (neuron, rank, seq, _) in wanted.items():
            self.store.write_bytes(f"{out}/layer-{layer:03d}.pt", tensor_bytes(
                {"neuron": neuron, "rank": rank, "seq_id": seq, "acts": acts[layer]}))
        windows = sum(len(seq_ids[b * bs:(b + 1) * bs]) for b in batches)
        self.store.write_json(f"{out}/done.json", {"windows_rerun": windows})
        return ChunkResult(chunk, windows, windows * self.spec.seq_len, time.perf_counter() - t0)
