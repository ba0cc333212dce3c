"""Per-neuron streaming summaries of one run's windows: the reservoirs of top, bottom and random records, the
quantile sketch, the running statistics, and the collectors that hold them for every requested layer. Fed once
per layer and batch by forward.py (with capture.py's per-window reductions); saved and merged by checkpoint.py
and the driver (orchestrator/extraction/), which turns each layer's collector into the `records` and
`neuron_stats` tables.

Everything per neuron is kept as tensors on the model's device and updated for all neurons of a layer at
once (no Python loop over neurons):
- top records: the `top_k` windows with the largest window maximum, ties to the lower seq_id (keys.py's int64
  keys, in a `TopReservoir` with spare slots and a per-neuron floor);
- bottom records (optional): the `bottom_k` windows with the most negative window minimum, ties to the lower
  seq_id (a second `TopReservoir`, on the keys of minus the minimum);
- random records: the windows of the neuron's pre-drawn sample (keys.py's `random_sample`), copied when a
  batch holds them;
- running mean / variance (Chan's parallel formula, float64), max, min, count of tokens > 0, token count and
  count of non-finite tokens (the others are over the finite tokens: capture.py's `mask_nonfinite`);
- for quantile records and the classifier windows (optional): the histogram of window maxima and each bucket's
  (and each band's) pick candidates (sketch.py).

Every summary merges exactly: collectors over disjoint slices of the corpus merge into the collector of the
whole.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from schemas.tables import NEURON_STATS, RECORDS
from workers.extract.capture import Summaries, mask_nonfinite, window_summaries
from workers.extract.errors import ExtractError
from workers.extract.keys import INT64_MIN, random_sample, seq_ids_of
from workers.extract.sketch import QuantileSketch

# A layer's random records in a batch: (neuron, rank, batch index) tensors (`ActivationCollector._random_hits`)
RandomHits = tuple[torch.Tensor, torch.Tensor, torch.Tensor]

PLACEHOLDER_END = INT64_MIN + 2 ** 24  # empty reservoir slots hold distinct keys below this; real keys are above


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
        assert n_enter is not None  # callers pass it with `enter`, else it was computed just above
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

    def merge(self, other: TopReservoir) -> None:
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

    def merge(self, other: RandomRecords) -> None:
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
    """Mergeable per-neuron moments: token count and count of non-finite tokens; over the finite tokens, mean
    and M2 (float64), max, min and count of tokens > 0."""

    def __init__(self, n_neurons: int, device):
        self.n = 0  # tokens seen, the same for every neuron
        self.n_nonfinite = torch.zeros(n_neurons, dtype=torch.int64, device=device)
        self.mean = torch.zeros(n_neurons, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_neurons, dtype=torch.float64, device=device)
        self.max = torch.full((n_neurons,), float("-inf"), dtype=torch.float32, device=device)
        self.min = torch.full((n_neurons,), float("inf"), dtype=torch.float32, device=device)
        self.n_pos = torch.zeros(n_neurons, dtype=torch.int64, device=device)

    @property
    def n_finite(self) -> torch.Tensor:
        return self.n - self.n_nonfinite

    def update(self, n_tokens: int, s: Summaries, nonfinite: torch.Tensor | None = None) -> None:
        """One batch's moments (from `window_summaries`, after `mask_nonfinite`); `nonfinite`: the batch's
        count of non-finite tokens per neuron (None: none)."""
        n_b = n_tokens if nonfinite is None else n_tokens - nonfinite
        self._combine(n_b, s.mean_b, s.m2_b)
        self.n += n_tokens
        if nonfinite is not None:
            self.n_nonfinite += nonfinite
        self.max = torch.maximum(self.max, s.wmax.amax(0))
        self.min = torch.minimum(self.min, s.wmin.amin(0))
        self.n_pos += s.npos

    def _combine(self, n_b, mean_b: torch.Tensor, m2_b: torch.Tensor) -> None:
        """Chan's formula per neuron: n_b (an int, or [N] counts) finite tokens of mean mean_b and M2 m2_b."""
        n_a = self.n_finite
        n = (n_a + n_b).double().clamp_min(1)  # a neuron with no finite token so far keeps mean 0, M2 0
        delta = mean_b - self.mean
        self.mean = self.mean + delta * (n_b / n)
        self.m2 = self.m2 + m2_b + delta.square() * (n_a * n_b / n)

    def merge(self, other: RunningStats) -> None:
        dev = self.mean.device
        self._combine(other.n_finite.to(dev), other.mean.to(dev), other.m2.to(dev))
        self.n += other.n
        self.n_nonfinite = self.n_nonfinite + other.n_nonfinite.to(dev)
        self.max = torch.maximum(self.max, other.max.to(dev))
        self.min = torch.minimum(self.min, other.min.to(dev))
        self.n_pos = self.n_pos + other.n_pos.to(dev)

    @property
    def variance(self) -> torch.Tensor:
        """Population variance (divided by the count of finite tokens)."""
        return self.m2 / self.n_finite.clamp_min(1)

    def state_dict(self) -> dict:
        return {"n": self.n, "n_nonfinite": self.n_nonfinite, "mean": self.mean, "m2": self.m2, "max": self.max,
                "min": self.min, "n_pos": self.n_pos}

    def load_state_dict(self, s: dict) -> None:
        dev = self.mean.device
        self.n = int(s["n"])
        self.mean, self.m2 = s["mean"].to(dev), s["m2"].to(dev)
        self.max, self.min, self.n_pos = s["max"].to(dev), s["min"].to(dev), s["n_pos"].to(dev)
        self.n_nonfinite = s["n_nonfinite"].to(dev)


class LayerCollector:
    """All streaming summaries of one layer's neurons."""

    def __init__(self, layer: int, spec: CollectorSpec, dtype: torch.dtype, device):
        self.layer, self.n_neurons, self.seq_len = layer, spec.n_neurons, spec.seq_len
        self.top = TopReservoir(spec.n_neurons, spec.top_k, spec.seq_len, dtype, device)
        self.bottom = TopReservoir(spec.n_neurons, spec.bottom_k, spec.seq_len, dtype, device)
        sample = random_sample(spec.seed, layer, spec.n_neurons, spec.corpus_tensor(), spec.n_random, device)
        self.random = RandomRecords(sample, spec.seq_len, dtype, device)
        self.stats = RunningStats(spec.n_neurons, device)
        self.quantiles = (QuantileSketch(spec.n_neurons, spec.sketch_per_bucket, spec.seed, layer, device,
                                         n_low=spec.n_non_activating)
                          if spec.sketch_per_bucket else None)

    def floors(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The top and bottom reservoirs' entry floors [N, 1] (None: no bottom records), the inputs of
        `window_summaries`."""
        return self.top.floor, self.bottom.floor if self.bottom.k else None

    def update(self, x: torch.Tensor, seq_ids: torch.Tensor, summarize=window_summaries,
               random_hits: RandomHits | None = None,
               summaries: Sequence[torch.Tensor] | None = None) -> None:
        """x [B, T, N]: this layer's neuron activations on a batch of windows with the given seq ids.
        `random_hits`: (neuron, rank, batch index) of this layer's random records in the batch (looked up by
        `ActivationCollector` for all layers at once). `summaries`: `window_summaries` of x against this layer's
        floors, when the caller computed them already (fused into the MLP's forward)."""
        if x.shape[1:] != (self.seq_len, self.n_neurons):
            raise ExtractError(f"layer {self.layer}: activations of shape {tuple(x.shape)}, expected "
                               f"[batch, {self.seq_len}, {self.n_neurons}]")
        floors = self.floors()
        if summaries is None:
            summaries = summarize(x, seq_ids, *floors)
        s, nonfinite = mask_nonfinite(x, Summaries(*summaries), seq_ids, *floors)
        self.stats.update(x.shape[0] * x.shape[1], s, None if nonfinite is None else nonfinite.per_neuron)
        self.top.offer(s.keys, x, s.enter, s.n_enter)
        if self.bottom.k:
            assert s.bottom_keys is not None  # floors() gave a bottom floor, so the summaries have bottom keys
            self.bottom.offer(s.bottom_keys, x, s.bottom_enter, s.bottom_n_enter)
        if random_hits is not None and random_hits[0].numel():
            self.random.fill(*random_hits, x)
        if self.quantiles is not None:
            self.quantiles.update(s.wmax, seq_ids, None if nonfinite is None else nonfinite.clean)

    def merge(self, other: LayerCollector) -> None:
        self.top.merge(other.top)
        self.bottom.merge(other.bottom)
        self.random.merge(other.random)
        self.stats.merge(other.stats)
        if self.quantiles is not None:
            assert other.quantiles is not None  # mergeable collectors share one spec, so both have a sketch
            self.quantiles.merge(other.quantiles)

    def state_dict(self) -> dict:
        s = {"top": self.top.state_dict(), "bottom": self.bottom.state_dict(), "random": self.random.state_dict(),
             "stats": self.stats.state_dict()}
        if self.quantiles is not None:
            s["quantiles"] = self.quantiles.state_dict()
        return s

    def load_state_dict(self, s: dict) -> None:
        self.top.load_state_dict(s["top"])
        self.bottom.load_state_dict(s["bottom"])
        self.random.load_state_dict(s["random"])
        self.stats.load_state_dict(s["stats"])
        if self.quantiles is not None:
            self.quantiles.load_state_dict(s["quantiles"])

    # --- output tables ---------------------------------------------------------------------------------------
    def records_table(self, extras: dict[str, dict] | None = None) -> pa.Table:
        """Rows sorted by neuron, then kind (top, bottom, random, then the `extras`' kinds in order: quantile,
        stratified, non_activating), then rank. `extras`: kind -> rows as {"neuron", "rank", "seq_id", "acts"}
        arrays (from `quantile_rows`). `max_activation` is the window's maximum over its finite activations
        (-inf if none)."""
        parts = [(kind, p) for kind, p in (("top", self._reservoir_rows(self.top)),
                                            ("bottom", self._reservoir_rows(self.bottom)),
                                            ("random", self._random_rows()), *(extras or {}).items())
                 if p is not None and len(p["neuron"])]
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
            pa.array(np.where(np.isfinite(acts), acts, -np.inf).max(axis=1).astype(np.float32)),
        ], schema=RECORDS)

    def _reservoir_rows(self, reservoir: TopReservoir) -> dict | None:
        keys, acts, filled = reservoir.sorted()
        if filled == 0:
            return None
        keys, acts_np = keys[:, :filled].cpu(), acts[:, :filled].float().cpu().numpy()
        return _rows(seq_ids_of(keys).numpy(), acts_np)

    def _random_rows(self) -> dict | None:
        if self.random.seq.shape[1] == 0:
            return None
        if not bool(self.random.filled.all()):
            missing = int((~self.random.filled).sum())
            raise ExtractError(f"layer {self.layer}: {missing} random records were never seen (the collector "
                               f"did not cover its whole corpus)")
        return _rows(self.random.seq.cpu().numpy(), self.random.acts.float().cpu().numpy())

    def stats_table(self) -> pa.Table:
        """One row per neuron. Everything but the token counts is over the finite activations, null for a
        neuron that had none; `window_max_quantiles` (quantile records only) is the sketch's estimate of the
        window maximum at quantiles 0.5, 0.9, 0.99, 0.999 (sketch.py)."""
        s = self.stats
        n = self.n_neurons
        none = (s.n_finite == 0).cpu().numpy()

        def col(t: torch.Tensor) -> pa.Array:
            return pa.array(t.cpu().numpy(), mask=none)
        if self.quantiles is None:
            quantiles = pa.nulls(n, NEURON_STATS.field("window_max_quantiles").type)
        else:
            q = self.quantiles.quantile_values().float().numpy()
            quantiles = pa.array([None if none[i] else [None if np.isnan(v) else float(v) for v in q[i]]
                                  for i in range(n)], NEURON_STATS.field("window_max_quantiles").type)
        return pa.Table.from_arrays([
            pa.array(np.full(n, self.layer, dtype=np.int16)), pa.array(np.arange(n, dtype=np.int32)),
            col(s.mean), col(s.variance), col(s.max),
            col(s.n_pos.double() / s.n_finite.clamp_min(1)),
            pa.array(np.full(n, s.n, dtype=np.int64)),
            col(s.min), pa.array(s.n_nonfinite.cpu().numpy()), quantiles,
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
    it before the first batch. `bottom_k`: bottom records per neuron (0: none). `n_per_quantile`: quantile
    records per bin (0: no quantile sketch). `units`: the config's `units` section as a dict, for SAE/transcoder
    latents or directions (workers/units/; n_neurons is then their width); None for MLP neurons.
    `classifier_bins`, `classifier_per_bin`, `n_non_activating`, `non_activating_below`: the classifier windows
    (sketch.py `classifier_picks`; 0 bins: none)."""
    layers: list[int]
    n_neurons: int
    seq_len: int
    top_k: int
    n_random: int
    seed: int
    corpus: Sequence[int] = ()
    bottom_k: int = 0
    n_per_quantile: int = 0
    units: dict | None = None
    classifier_bins: int = 0
    classifier_per_bin: int = 0
    n_non_activating: int = 0
    non_activating_below: float = 0.0

    @property
    def sketch_per_bucket(self) -> int:
        """Pick candidates the sketch keeps per bucket (0: no sketch)."""
        return max(self.n_per_quantile, self.classifier_per_bin if self.classifier_bins else 0)

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
        self._hits: dict[int, RandomHits] = {}
        self._index: tuple | None = None

    def update(self, layer: int, x: torch.Tensor, seq_ids: torch.Tensor,
               summaries: Sequence[torch.Tensor] | None = None) -> None:
        if seq_ids is not self._hits_for:
            self._hits, self._hits_for = self._random_hits(seq_ids), seq_ids
        self.layers[layer].update(x, seq_ids, self.summarize, self._hits.get(layer), summaries)

    def floors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A layer's top and bottom entry floors (`LayerCollector.floors`)."""
        return self.layers[layer].floors()

    def _random_hits(self, seq_ids: torch.Tensor) -> dict[int, RandomHits]:
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

    def merge(self, other: ActivationCollector) -> None:
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


class LayerCapture:
    """Stands in for a collector in `ActivationExtractor`: keeps each hooked layer's activations of the last
    batch (the quantile pass copies a few windows out of them)."""

    def __init__(self, layers: Iterable[int], n_neurons: int, device="cpu", bottom: bool = False):
        self.layers = dict.fromkeys(layers)
        self.acts: dict[int, torch.Tensor] = {}
        self.n_windows = 0
        floor = torch.full((n_neurons, 1), INT64_MIN, dtype=torch.int64, device=device)
        self._floors = (floor, floor if bottom else None)

    def update(self, layer: int, x: torch.Tensor, seq_ids: torch.Tensor, summaries=None) -> None:
        self.acts[layer] = x

    def floors(self, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The same shapes as the first pass's collector (`bottom`: it has bottom records), so a compiled capture
        is reused rather than compiled anew."""
        return self._floors
