"""Activation extraction: one forward pass per batch feeds per-neuron streaming summaries of every layer.

Everything per neuron is kept as tensors on the model's device and updated for all neurons of a layer at
once (no Python loop over neurons):
- top records: the `top_k` windows with the largest window maximum, ties to the lower seq_id;
- random records: a bottom-k sample over a hash of (seed, layer, neuron, seq_id) - uniform without
  replacement, independent per neuron, reproducible, and mergeable because a window's priority never depends
  on what else was seen;
- running mean / variance (Chan's parallel formula, float64), max, count of tokens > 0, token count.

Both record reservoirs rank windows by one int64 key: a 32-bit primary (the window max as an order-preserving
integer, or the negated hash priority) in the high half and `2**32 - 1 - seq_id` in the low half. Keys are
unique per neuron, so "keep the k largest keys" is exact, tie-breaking included, and a merge of two
reservoirs is the reservoir of the union. Empty slots hold distinct keys below every real key.

No Ray here: `ExtractWorker` (model + collector + checkpoint files in a run store) is what the Ray actor wraps.
"""
from __future__ import annotations

import io
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import torch

from schemas.tables import NEURON_STATS, RECORDS

INT64_MIN = -(2 ** 63)
LOW_MASK = 2 ** 32 - 1
MAX_SEQ_ID = LOW_MASK
MASK64 = 2 ** 64 - 1
MIX1, MIX2, GOLDEN = 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15
PRIORITY_BITS = 31


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
    """The random-record priority of a window for a neuron: smaller is sampled first (the slow reference)."""
    return mix64_py(neuron_salt_py(seed, layer, neuron) + seq_id * GOLDEN) >> (64 - PRIORITY_BITS)


def neuron_salts(seed: int, layer: int, n_neurons: int, device) -> torch.Tensor:
    """Per-neuron hash salt, as int64 (the two's-complement view of the unsigned value)."""
    return torch.tensor([_signed(neuron_salt_py(seed, layer, n)) for n in range(n_neurons)],
                        dtype=torch.int64, device=device)


def random_priorities(salts: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[N] salts x [B] seq ids -> [N, B] priorities in [0, 2**31)."""
    return _shr(mix64(salts[:, None] + seq_ids[None, :] * _signed(GOLDEN)), 64 - PRIORITY_BITS)


def float_order_key(x: torch.Tensor) -> torch.Tensor:
    """float32 -> int64 in the int32 range with the same order (-0.0 counts as +0.0)."""
    bits = (x.float() + 0.0).view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def pack_keys(primary: torch.Tensor, seq_ids: torch.Tensor) -> torch.Tensor:
    """[..., B] primaries with [B] seq ids -> keys: larger primary first, then lower seq_id."""
    return primary * (2 ** 32) + (LOW_MASK - seq_ids)


def seq_ids_of(keys: torch.Tensor) -> torch.Tensor:
    return LOW_MASK - (keys & LOW_MASK)


def window_reductions(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """[B, T, N] activations -> per (window, neuron): max, sum, sum of squares (float32) and count > 0."""
    xf = x.float()
    return xf.amax(1), xf.sum(1), (xf * xf).sum(1), (xf > 0).sum(1, dtype=torch.int32)


# --- reservoirs and stats -------------------------------------------------------------------------------------
class KeyedReservoir:
    """Per neuron, the k windows with the largest keys and their per-token activations."""

    def __init__(self, n_neurons: int, k: int, seq_len: int, dtype: torch.dtype, device):
        self.k = k
        self.keys = self.empty_keys(n_neurons, k, device)
        self.acts = torch.zeros(n_neurons, k, seq_len, dtype=dtype, device=device)

    @staticmethod
    def empty_keys(n: int, k: int, device) -> torch.Tensor:
        return (INT64_MIN + torch.arange(k, device=device, dtype=torch.int64)).expand(n, k).clone()

    def offer(self, cand: torch.Tensor, acts: torch.Tensor) -> None:
        """cand [N, B] keys of this batch's windows; acts [B, T, N] their activations."""
        if self.k == 0:
            return
        better = cand > self.keys.min(dim=1, keepdim=True).values
        if not bool(better.any()):
            return
        pool = torch.cat([self.keys, cand], dim=1)
        kth = pool.topk(self.k, dim=1, sorted=False).values.min(dim=1, keepdim=True).values
        leaving_n, leaving_slot = (self.keys < kth).nonzero(as_tuple=True)
        entering_n, entering_b = (cand >= kth).nonzero(as_tuple=True)  # row-major: pairs up with leaving
        if entering_n.numel() != leaving_n.numel():
            raise ExtractError("a window was offered twice to the same collector (keys must be unique)")
        self.keys[leaving_n, leaving_slot] = cand[entering_n, entering_b]
        self.acts[leaving_n, leaving_slot] = acts[entering_b, :, entering_n].to(self.acts.dtype)

    def merge(self, other: "KeyedReservoir") -> None:
        if self.k == 0:
            return
        keys = torch.cat([self.keys, other.keys.to(self.keys.device)], dim=1)
        acts = torch.cat([self.acts, other.acts.to(self.acts.device, self.acts.dtype)], dim=1)
        top, idx = keys.topk(self.k, dim=1)
        self.acts = acts.gather(1, idx[..., None].expand(-1, -1, acts.shape[2])).contiguous()
        empty = top < INT64_MIN + self.k  # re-number empty slots so keys stay unique
        self.keys = torch.where(empty, self.empty_keys(*top.shape, top.device), top)

    def sorted(self) -> tuple[torch.Tensor, torch.Tensor, int]:
        """(keys [N, k], acts [N, k, T]) largest key first, and how many slots are filled."""
        keys, idx = self.keys.topk(self.k, dim=1) if self.k else (self.keys, self.keys)
        acts = self.acts.gather(1, idx[..., None].expand(-1, -1, self.acts.shape[2]))
        filled = int((keys[0] >= INT64_MIN + self.k).sum()) if keys.numel() else 0
        return keys, acts, filled

    def state_dict(self) -> dict:
        return {"keys": self.keys, "acts": self.acts}

    def load_state_dict(self, state: dict) -> None:
        self.keys = state["keys"].to(self.keys.device)
        self.acts = state["acts"].to(self.acts.device, self.acts.dtype)


class RunningStats:
    """Mergeable per-neuron moments: token count, mean and M2 (float64), max, count of tokens > 0."""

    def __init__(self, n_neurons: int, device):
        self.n = 0
        self.mean = torch.zeros(n_neurons, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(n_neurons, dtype=torch.float64, device=device)
        self.max = torch.full((n_neurons,), float("-inf"), dtype=torch.float32, device=device)
        self.n_pos = torch.zeros(n_neurons, dtype=torch.int64, device=device)

    def update(self, wmax, s1, s2, npos, seq_len: int) -> None:
        """Per-window reductions [B, N] of one batch; windows are combined exactly in float64."""
        s1, s2 = s1.double(), s2.double()
        mean_w = s1 / seq_len
        m2_w = (s2 - s1 * mean_w).clamp_min(0)
        n_b = s1.shape[0] * seq_len
        mean_b = s1.sum(0) / n_b
        m2_b = m2_w.sum(0) + seq_len * (mean_w - mean_b).square().sum(0)
        self._combine(n_b, mean_b, m2_b)
        self.max = torch.maximum(self.max, wmax.amax(0))
        self.n_pos += npos.sum(0, dtype=torch.int64)

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

    def __init__(self, layer: int, n_neurons: int, seq_len: int, top_k: int, n_random: int, seed: int,
                 dtype: torch.dtype, device):
        self.layer, self.n_neurons, self.seq_len = layer, n_neurons, seq_len
        self.top = KeyedReservoir(n_neurons, top_k, seq_len, dtype, device)
        self.random = KeyedReservoir(n_neurons, n_random, seq_len, dtype, device)
        self.stats = RunningStats(n_neurons, device)
        self.salts = neuron_salts(seed, layer, n_neurons, device)

    def update(self, x: torch.Tensor, seq_ids: torch.Tensor, reduce=window_reductions) -> None:
        """x [B, T, N]: this layer's neuron activations on a batch of windows with the given seq ids."""
        if x.shape[1:] != (self.seq_len, self.n_neurons):
            raise ExtractError(f"layer {self.layer}: activations of shape {tuple(x.shape)}, expected "
                               f"[batch, {self.seq_len}, {self.n_neurons}]")
        wmax, s1, s2, npos = reduce(x)
        self.stats.update(wmax, s1, s2, npos, self.seq_len)
        self.top.offer(pack_keys(float_order_key(wmax.T), seq_ids), x)
        if self.random.k:
            self.random.offer(pack_keys(-random_priorities(self.salts, seq_ids), seq_ids), x)

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
    def records_table(self) -> pa.Table:
        """Rows sorted by neuron, then kind (top before random), then rank."""
        parts = [self._reservoir_rows("top", self.top), self._reservoir_rows("random", self.random)]
        parts = [p for p in parts if p is not None]
        if not parts:
            return RECORDS.empty_table()
        neuron = np.concatenate([p["neuron"] for p in parts])
        order = np.argsort(neuron, kind="stable")  # each part is neuron-major already; stable keeps kind, rank
        acts = np.concatenate([p["acts"] for p in parts])[order]
        n_rows, t = acts.shape
        values = pa.array(acts.reshape(-1), type=pa.float32())
        offsets = pa.array(np.arange(0, n_rows * t + 1, t, dtype=np.int32))
        return pa.Table.from_arrays([
            pa.array(np.full(n_rows, self.layer, dtype=np.int16)),
            pa.array(neuron[order].astype(np.int32)),
            pa.array(np.concatenate([p["kind"] for p in parts])[order].tolist(), type=pa.string()),
            pa.array(np.concatenate([p["rank"] for p in parts])[order].astype(np.int16)),
            pa.array(np.concatenate([p["seq_id"] for p in parts])[order].astype(np.int64)),
            pa.ListArray.from_arrays(offsets, values),
            pa.array(acts.max(axis=1).astype(np.float32)),
        ], schema=RECORDS)

    def _reservoir_rows(self, kind: str, res: KeyedReservoir) -> dict | None:
        keys, acts, filled = res.sorted()
        if filled == 0:
            return None
        keys, acts = keys[:, :filled].cpu(), acts[:, :filled].float().cpu().numpy()
        n = keys.shape[0]
        return {"neuron": np.repeat(np.arange(n), filled), "kind": np.full(n * filled, kind, dtype=object),
                "rank": np.tile(np.arange(filled), n), "seq_id": seq_ids_of(keys).numpy().reshape(-1),
                "acts": acts.reshape(n * filled, -1)}

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


@dataclass
class CollectorSpec:
    """What to collect; the same spec on every actor makes their collectors mergeable."""
    layers: list[int]
    n_neurons: int
    seq_len: int
    top_k: int
    n_random: int
    seed: int


class ActivationCollector:
    """Summaries of every requested layer, plus which corpus chunks they cover."""

    def __init__(self, spec: CollectorSpec, *, dtype: torch.dtype = torch.float32, device="cpu",
                 reduce=window_reductions):
        self.spec = spec
        self.reduce = reduce
        self.layers = {layer: LayerCollector(layer, spec.n_neurons, spec.seq_len, spec.top_k, spec.n_random,
                                             spec.seed, dtype, device) for layer in spec.layers}
        self.done_chunks: set[int] = set()
        self.n_windows = 0

    def update(self, layer: int, x: torch.Tensor, seq_ids: torch.Tensor) -> None:
        self.layers[layer].update(x, seq_ids, self.reduce)

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
    """Runs the subject model's trunk on batches and feeds every requested layer's down-projection input
    to a collector, from one forward pass. The LM head and the layers after the last requested one are
    skipped."""

    def __init__(self, loaded, collector: ActivationCollector):
        self.loaded = loaded
        self.collector = collector
        self.trunk = loaded.model.base_model
        self.device = next(loaded.model.parameters()).device
        self._seq_ids: torch.Tensor | None = None
        last = max(collector.layers)
        self._hooks = [loaded.down_proj(layer).register_forward_pre_hook(self._hook(layer, layer == last))
                       for layer in collector.layers]

    def _hook(self, layer: int, last: bool):
        def hook(module, args):
            if self._seq_ids is None:  # a forward not started by run_batch: not ours to record
                return
            self.collector.update(layer, args[0], self._seq_ids)
            if last:
                raise _StopForward
        return hook

    def close(self) -> None:
        for h in self._hooks:
            h.remove()

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


def compiled_reductions():
    """`window_reductions` fused into one kernel by torch.compile (one read of the activations)."""
    return torch.compile(window_reductions, dynamic=False)


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
    compile: bool = False
    loaded: object = field(default=None, repr=False)

    def __post_init__(self):
        from workers.models import load_subject

        if self.loaded is None:
            self.loaded = load_subject(self.model_name, dtype=self.dtype, device=self.device)
        param = next(self.loaded.model.parameters())
        reduce = compiled_reductions() if self.compile else window_reductions
        self.collector = ActivationCollector(self.spec, dtype=param.dtype, device=param.device, reduce=reduce)
        load_collector(self.store, self.slot, self.collector)
        self.extractor = ActivationExtractor(self.loaded, self.collector)

    def done_chunks(self) -> list[int]:
        return sorted(self.collector.done_chunks)

    def process(self, chunk: int) -> ChunkResult:
        if chunk in self.collector.done_chunks:
            return ChunkResult(chunk, 0, 0, 0.0, skipped=True)
        t0 = time.perf_counter()
        token_ids, seq_ids = read_chunk(self.store, chunk)
        self.extractor.run(token_ids, seq_ids, self.batch_size)
        self.collector.done_chunks.add(chunk)
        save_collector(self.store, self.slot, self.collector)
        return ChunkResult(chunk, len(seq_ids), token_ids.numel(), time.perf_counter() - t0)
