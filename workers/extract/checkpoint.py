"""A worker's state in the run store: its collector's checkpoint (one slot per worker) and the tensor files it
is made of. The paths are schemas/layout.py's; the worker (worker.py) writes them, the driver
(orchestrator/extraction/) reads them to resume, to pick quantile windows and to merge the slots.
"""
from __future__ import annotations

import io
from collections.abc import Iterable
from typing import Any, Protocol

import torch

from schemas.layout import (
    CHECKPOINTS_DIR,
    checkpoint_gen_dir,
    checkpoint_head,
    checkpoint_head_slot,
    checkpoint_layer_file,
)
from workers.extract.collectors import ActivationCollector


class WorkerStore(Protocol):
    """What the workers use of the run store: orchestrator/store.py's `RunStore` (not imported here: workers/
    does not depend on orchestrator/)."""

    @property
    def fs(self) -> Any: ...  # a pyarrow.fs.FileSystem (pyarrow has no type information)

    def path(self, *parts: str) -> str: ...

    def exists(self, *parts: str) -> bool: ...

    def list_files(self, prefix: str) -> list[str]: ...

    def read_json(self, rel: str) -> Any: ...

    def write_json(self, rel: str, obj: Any) -> None: ...

    def write_bytes(self, rel: str, data: bytes) -> None: ...


def save_collector(store: WorkerStore, slot: int, collector: ActivationCollector) -> None:
    """One file per layer under a fresh generation folder, then the head document that points at it (the
    commit point), then the old generation is removed. A crash at any moment leaves a readable checkpoint."""
    gen = collector.n_windows
    head_old = read_head(store, slot)
    for layer, c in collector.layers.items():
        store.write_bytes(checkpoint_layer_file(slot, gen, layer), tensor_bytes(c.state_dict()))
    store.write_json(checkpoint_head(slot), {"gen": gen, "done_chunks": sorted(collector.done_chunks),
                                             "n_windows": collector.n_windows})
    if head_old is not None and head_old["gen"] != gen:
        try:
            store.fs.delete_dir(store.path(checkpoint_gen_dir(slot, head_old["gen"])))
        except (FileNotFoundError, OSError):
            pass  # a leftover folder is harmless: only the head's generation is ever read


def read_head(store: WorkerStore, slot: int) -> dict | None:
    rel = checkpoint_head(slot)
    return store.read_json(rel) if store.exists(rel) else None


def slot_heads(store: WorkerStore) -> dict[int, dict]:
    """Every checkpoint slot's head document: which chunks its saved collector covers."""
    heads: dict[int, dict] = {}
    for path in store.list_files(CHECKPOINTS_DIR):
        if path.endswith("/head.json"):
            slot = checkpoint_head_slot(path)
            head = read_head(store, slot)
            assert head is not None  # its head.json was just listed, so read_head found it
            heads[slot] = head
    return heads


def load_collector(store: WorkerStore, slot: int, collector: ActivationCollector,
                   layers: Iterable[int] | None = None) -> bool:
    """Fill `collector` from the slot's checkpoint; False when there is none."""
    head = read_head(store, slot)
    if head is None:
        return False
    collector.done_chunks = set(head["done_chunks"])
    collector.n_windows = int(head["n_windows"])
    for layer in (collector.layers if layers is None else layers):
        collector.layers[layer].load_state_dict(load_layer_state(store, slot, head["gen"], layer))
    return True


def load_layer_state(store: WorkerStore, slot: int, gen: int, layer: int) -> dict:
    """One layer's collector state (`LayerCollector.state_dict`) of a slot's checkpoint generation."""
    return tensor_load(read_bytes(store, checkpoint_layer_file(slot, gen, layer)))


def tensor_bytes(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def tensor_load(data: bytes):
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def read_bytes(store: WorkerStore, rel: str) -> bytes:
    with store.fs.open_input_stream(store.path(rel)) as f:
        return f.read()
