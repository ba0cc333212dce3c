"""Per-window reductions of a batch's neuron activations, and the fused capture that computes them together
with the MLP's neuron step (compiled by torch.compile where it pays). Called from forward.py once per layer
and batch; what it returns feeds the collectors (collectors.py).

Cost, per layer and batch, is what decides the design: the reductions must not cost a second read of the
[B, T, N] activations from memory. One fused pass gives every per-window number at once (max, min, sum, sum
of squares, count of tokens > 0), and on a CPU it runs slice by slice (`slice_rows`) so the reductions read
each slice from cache. The top (and bottom) keys and the `enter` masks against the reservoirs' floors come out
of the same call, so a batch's reservoir update (collectors.py) costs a compare plus copies of the few
windows above the floor.

Non-finite activations (fp16 overflow, docs/method.md §2) cost nothing on that path: a NaN or ±inf anywhere in
a neuron's batch makes its float64 M2 non-finite, and only such neurons are recomputed, eagerly and masked,
by `mask_nonfinite`.
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from workers.extract.keys import NONFINITE_PRIMARY, float_order_key, pack_keys

log = logging.getLogger(__name__)


class Summaries(NamedTuple):
    """A batch's per-window summaries for one layer: top keys [N, B], which of them reach the top reservoir's
    floor and how many per neuron, window maxima and minima [B, N] float32, the batch's moments per neuron
    (mean, M2 in float64, count of tokens > 0), and the bottom keys, entries and counts (None without bottom
    records). After `mask_nonfinite`, every number is over the finite activations only."""
    keys: torch.Tensor
    enter: torch.Tensor
    n_enter: torch.Tensor
    wmax: torch.Tensor
    wmin: torch.Tensor
    mean_b: torch.Tensor
    m2_b: torch.Tensor
    npos: torch.Tensor
    bottom_keys: torch.Tensor | None = None
    bottom_enter: torch.Tensor | None = None
    bottom_n_enter: torch.Tensor | None = None


def window_reductions(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """[B, T, N] activations -> per-window [B, N] float32: max, min, sum, sum of squares, count of tokens > 0.
    Every number is a reduction over T only, so that compiled they share one loop over x (a count over
    (B, T) at once was a second full read of x in Inductor's code). Counts are exact in float32 (T < 2**24)."""
    xf = x.float()
    return xf.amax(1), xf.amin(1), xf.sum(1), (xf * xf).sum(1), (xf > 0).float().sum(1)


def top_keys(wmax: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, N] window maxima -> [N, B] top keys: larger maximum first, ties to the lower seq_id."""
    return pack_keys(float_order_key(wmax.T), seq_ids)


def bottom_keys(wmin: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, N] window minima -> [N, B] bottom keys: more negative minimum first, ties to the lower seq_id
    (negation is exact in floating point, so this is the top order of -min)."""
    return pack_keys(float_order_key(-wmin.T), seq_ids)


def batch_summaries(t: int, wmax, wmin, s1, s2, npos_w, seq_ids: torch.Tensor, floor: torch.Tensor,
                    bottom_floor: torch.Tensor | None = None) -> tuple:
    """Per-window reductions of a batch of windows of T = `t` tokens -> the fields of `Summaries`, as a plain
    tuple (what a compiled function returns)."""
    s1, s2 = s1.double(), s2.double()
    mean_w = s1 / t
    m2_w = (s2 - s1 * mean_w).clamp_min(0)
    mean_b = mean_w.mean(0)
    m2_b = m2_w.sum(0) + t * (mean_w - mean_b).square().sum(0)
    keys = top_keys(wmax, seq_ids)
    enter = keys >= floor
    out = (keys, enter, enter.sum(1), wmax, wmin, mean_b, m2_b, npos_w.sum(0).to(torch.int64))
    if bottom_floor is None:
        return out + (None, None, None)
    bkeys = bottom_keys(wmin, seq_ids)
    benter = bkeys >= bottom_floor
    return out + (bkeys, benter, benter.sum(1))


def window_summaries(x: torch.Tensor, seq_ids: torch.Tensor, floor: torch.Tensor,
                     bottom_floor: torch.Tensor | None = None) -> tuple:
    """[B, T, N] activations -> the fields of `Summaries` against the top reservoir's `floor` [N, 1] (and the
    bottom reservoir's, if any). One read of x when compiled (`compiled_summaries`).
    Per-window sums are float32 (T terms) and centred per window before they are combined in float64."""
    return batch_summaries(x.shape[1], *window_reductions(x), seq_ids, floor, bottom_floor)


class NonFinite(NamedTuple):
    """Where a batch had non-finite activations: per neuron, how many tokens [N] int64; per window, whether
    the window holds any [B, N] bool (`clean` is its negation)."""
    per_neuron: torch.Tensor
    clean: torch.Tensor


def mask_nonfinite(x: torch.Tensor, s: Summaries, seq_ids: torch.Tensor, floor: torch.Tensor,
                   bottom_floor: torch.Tensor | None) -> tuple[Summaries, NonFinite | None]:
    """`s` with every neuron that saw a NaN or ±inf in this batch recomputed over its finite activations only
    (docs/method.md §2), and where they were; (s, None) when there were none (the usual case: one check of [N]).

    A NaN or ±inf token makes its window's sum of squares non-finite, so the neuron's float64 M2 too; a sum of
    squares that overflows float32 (|x| above ~1e19) lands here as well and is simply recomputed in float64.
    For a recomputed neuron: the moments and the count of tokens > 0 are over its finite tokens; a window's
    max and min are over its finite tokens (-inf / +inf if none); a window holding any non-finite token gets
    the lowest top and bottom key there is for a real window (`NONFINITE_PRIMARY`), so it ranks after every
    all-finite window and never displaces one."""
    bad = ~torch.isfinite(s.m2_b)
    if not bool(bad.any()):
        return s, None
    idx = bad.nonzero().squeeze(1)
    xs = x[:, :, idx].double()  # [B, T, k]
    fin = torch.isfinite(xs)
    dirty = (~fin).any(1)  # [B, k]
    inf = torch.tensor(float("inf"), dtype=torch.float64, device=xs.device)
    wmax_k = torch.where(fin, xs, -inf).amax(1).float()
    wmin_k = torch.where(fin, xs, inf).amin(1).float()
    n_fin = fin.sum((0, 1))
    mean_k = torch.where(fin, xs, 0).sum((0, 1)) / n_fin.clamp_min(1)
    m2_k = torch.where(fin, xs - mean_k, 0).square().sum((0, 1))
    npos_k = (fin & (xs > 0)).sum((0, 1))

    wmax, wmin, mean_b, m2_b, npos = s.wmax.clone(), s.wmin.clone(), s.mean_b.clone(), s.m2_b.clone(), s.npos.clone()
    wmax[:, idx], wmin[:, idx], mean_b[idx], m2_b[idx], npos[idx] = wmax_k, wmin_k, mean_k, m2_k, npos_k
    low = pack_keys(torch.full_like(dirty.T, NONFINITE_PRIMARY, dtype=torch.int64), seq_ids)

    def rekey(keys, new, floor_):
        keys = keys.clone()
        keys[idx] = torch.where(dirty.T, low, new)
        enter = keys >= floor_
        return keys, enter, enter.sum(1)

    keys, enter, n_enter = rekey(s.keys, top_keys(wmax_k, seq_ids), floor)
    bottom = (None, None, None)
    if bottom_floor is not None:
        bottom = rekey(s.bottom_keys, bottom_keys(wmin_k, seq_ids), bottom_floor)
    per_neuron = torch.zeros_like(npos)
    per_neuron[idx] = (~fin).sum((0, 1))
    clean = torch.ones_like(wmax, dtype=torch.bool)
    clean[:, idx] = ~dirty
    return Summaries(keys, enter, n_enter, wmax, wmin, mean_b, m2_b, npos, *bottom), NonFinite(per_neuron, clean)


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
COMPILE_OPTIONS: dict[str, str | int | bool | Callable[..., Any]] = {"emulate_precision_casts": True}


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
    """The MLP's neuron step and `window_summaries` as one function: (inputs, seq_ids, floor, bottom_floor) ->
    (activations, *summaries). Compiled, the reductions read each activation while it is computed (on a GPU)
    or while it is in cache (on a CPU, slice by slice: `slice_rows`) instead of from memory afterwards, and the
    step itself is one kernel instead of eager's one per op. The slices are unrolled at trace time (the shapes
    are static)."""
    from workers.models.registry import elementwise_of

    elementwise = elementwise_of(kind, act)

    def capture(inputs, seq_ids, floor, bottom_floor):
        b = inputs[0].shape[0]
        rows = slice_rows(inputs[0]) if compile else b
        hs = [elementwise(*(t[i:i + rows] for t in inputs)) for i in range(0, b, rows)]
        h, reductions = _cat(hs), [_cat(list(r)) for r in zip(*map(window_reductions, hs))]
        wmax, wmin, s1, s2, npos_w = reductions
        return (h, *batch_summaries(h.shape[1], wmax, wmin, s1, s2, npos_w, seq_ids, floor, bottom_floor))
    return compile_or_eager(capture) if compile else capture


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _warn_eager(error: Exception) -> None:
    first = (str(error).strip().splitlines() or [""])[0][:200]
    log.warning("torch.compile of the per-window reductions failed (%s: %s); running them eagerly",
                type(error).__name__, first)
