"""Hooking the subject model and running the batch forward: one trunk pass per batch feeds every requested
layer's neuron activations (with capture.py's per-window reductions) to a collector (collectors.py). Used by
the worker (worker.py) for the first pass and the quantile pass, and directly by tests and bench/extract.py.
"""
from __future__ import annotations

import torch

from workers.extract.capture import fused_capture
from workers.extract.errors import ExtractError
from workers.extract.keys import MAX_SEQ_ID


class _StopForward(Exception):
    """Raised after the last requested layer: the rest of the model is not needed."""


class ActivationExtractor:
    """Runs the subject model's trunk on batches and feeds every requested layer's neuron activations to a
    collector, from one forward pass. The LM head and the layers after the last requested one are skipped.

    Where the family's MLP shape is known (`workers.models.mlp_split`), a requested layer's MLP forward is
    replaced, while the extractor is open, by the same computation with the neuron step and the per-window
    reductions fused into one function (`fused_capture`, compiled when `compile`); other families are read
    through a forward pre-hook on the down projection. `captures`: a dict shared between extractors over the
    same model, so that a second extractor reuses the first one's compiled functions. `units`: a
    `workers.units.source.UnitSet` to read SAE/transcoder latents or directions instead of neurons, encoded by a
    capture at each layer's hook point inside the same forward pass."""

    def __init__(self, loaded, collector, compile: bool = False, captures: dict | None = None, units=None):
        self.loaded = loaded
        self.collector = collector
        self.trunk = loaded.model.base_model
        self.device = next(loaded.model.parameters()).device
        self._seq_ids: torch.Tensor | None = None
        self._hooks, self._patched = [], []
        self._shape: tuple[int, ...] = (0, 0)  # the batch's token_ids shape (B, T)
        captures = {} if captures is None else captures
        last = max(collector.layers)
        if units is not None:
            from workers.units.hooks import register_capture

            for layer in collector.layers:
                u = units.by_layer[layer]
                self._hooks.append(register_capture(loaded.model, u.hook,
                                                    self._unit_hook(layer, u.dictionary, layer == last)))
            return
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

    def _unit_hook(self, layer: int, dictionary, last: bool):
        from workers.units.hooks import as_btd
        from workers.units.source import unit_latents

        def capture(x):
            if self._seq_ids is None:
                return
            self.collector.update(layer, unit_latents(dictionary, as_btd(x, *self._shape)), self._seq_ids)
            if last:
                raise _StopForward
        return capture

    def _fused_forward(self, layer: int, split, capture, last: bool):
        original = split.module.forward

        def forward(x):
            if self._seq_ids is None:
                return original(x)
            h, *summaries = capture(split.inputs(x), self._seq_ids, *self.collector.floors(layer))
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
        self._shape = tuple(token_ids.shape)
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
