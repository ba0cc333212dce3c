"""The generation batch of the local backend: rows that decode together, one token per row per step.

A row is one chat request. Its prompt's keys/values are computed on their own (from the cached prompt prefix
when there is one) and copied into a slot of a buffer shared by all rows: per layer, keys and values of shape
(slots, kv_heads, capacity, head_dim). A row occupies columns 0..len-1 of its slot, and each step writes every
row's new key/value at that row's own next column, so rows of any lengths step together without padding
in front of them; the attention mask hides the columns past a row's own length. Each row carries its own
positions, so its tokens do not depend on which rows it shares a step with.

A step copies nothing: the buffer is allocated with room for the rows' prompts and `max_tokens`, and grows
(one copy) only when a joining row needs more. A row that leaves hands its slot to the last row (one row's
keys/values move), so the occupied slots stay contiguous.
"""
from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer


class _SlotLayer(DynamicLayer):
    """One layer of the shared buffer as the model sees it during a step."""

    def __init__(self, batch: DecodeBatch, index: int):
        super().__init__()
        self.batch, self.index = batch, index
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # the buffer exists before the first step

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        b = self.batch
        n, width = len(b.rows), b.width + 1
        keys, values = b.keys[self.index], b.values[self.index]
        # one new token per row, each at its own row's next column
        keys[b.slot_index, :, b.column_index] = key_states[:, :, 0]
        values[b.slot_index, :, b.column_index] = value_states[:, :, 0]
        self.keys, self.values = keys[:n, :, :width], values[:n, :, :width]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.batch.width

    def get_mask_sizes(self, query_length: int, *args) -> tuple[int, int]:
        return self.batch.width + query_length, 0


class DecodeBatch:
    """Rows (any objects) with their keys/values in a shared slot buffer; `step` runs one token per row."""

    def __init__(self, n_layers: int):
        self.n_layers = n_layers
        self.rows: list[Any] = []
        self.lengths: list[int] = []  # tokens of each row in the buffer (its next column and position)
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.cache = Cache(layers=[_SlotLayer(self, i) for i in range(n_layers)])
        self.slot_index = self.column_index = torch.zeros(0, dtype=torch.long)

    @property
    def width(self) -> int:
        """Columns any row uses so far (the attention of a step spans these and the new one)."""
        return max(self.lengths, default=0)

    @property
    def capacity(self) -> tuple[int, int]:
        return (self.keys[0].shape[0], self.keys[0].shape[2]) if self.keys else (0, 0)

    def kv_tokens(self) -> int:
        """Key/value positions allocated (slots x columns): what the buffer holds in memory."""
        slots, columns = self.capacity
        return slots * columns

    def add(self, row: Any, kv: list[tuple[torch.Tensor, torch.Tensor]], room: int, *, joining: int = 1) -> None:
        """Put a row whose prompt keys/values are `kv` (per layer, batch 1) into the next slot, with `room`
        columns free after them for the tokens it may still generate. `joining`: rows about to be added in
        this round, this one included (the buffer grows once for all of them)."""
        length = kv[0][0].shape[2]
        if not self.keys:
            self._allocate(kv, joining, length + room)
        else:
            slots, columns = self.capacity
            if len(self.rows) == slots or length + room > columns:
                self._grow(max(slots, len(self.rows) + joining), max(columns, length + room))
        slot = len(self.rows)
        for i, (k, v) in enumerate(kv):
            self.keys[i][slot, :, :length] = k[0]
            self.values[i][slot, :, :length] = v[0]
        self.rows.append(row)
        self.lengths.append(length)

    def remove(self, rows: set[int]) -> None:
        """Drop rows (by `id`); the last row moves into each freed slot."""
        i = 0
        while i < len(self.rows):
            if id(self.rows[i]) not in rows:
                i += 1
                continue
            last = len(self.rows) - 1
            if i != last:
                n = self.lengths[last]
                for keys, values in zip(self.keys, self.values):
                    keys[i, :, :n] = keys[last, :, :n]
                    values[i, :, :n] = values[last, :, :n]
                self.rows[i], self.lengths[i] = self.rows[last], self.lengths[last]
            self.rows.pop()
            self.lengths.pop()
        if not self.rows:  # free the memory between bursts of requests
            self.keys, self.values = [], []

    def step(self, lm: torch.nn.Module, tokens: list[int]) -> torch.Tensor:
        """Feed each row its next token; returns the logits of every row's next position (rows x vocab)."""
        n = len(self.rows)
        slots, columns = self.capacity
        if self.width + 1 > columns:  # a row generating past the room it was given
            self._grow(slots, columns + max(16, columns // 4))
        device = self.keys[0].device
        lengths = torch.tensor(self.lengths, dtype=torch.long, device=device)
        self.slot_index = torch.arange(n, device=device)
        self.column_index = lengths
        mask = (torch.arange(self.width + 1, device=device)[None, :] <= lengths[:, None]).long()
        out = lm(input_ids=torch.tensor(tokens, device=device)[:, None], attention_mask=mask,
                 position_ids=lengths[:, None], past_key_values=self.cache, use_cache=True)
        self.lengths = [x + 1 for x in self.lengths]
        return out.logits[:, -1]

    def _allocate(self, kv: list[tuple[torch.Tensor, torch.Tensor]], slots: int, columns: int) -> None:
        # zeros, not empty: masked columns still enter the attention as value x 0, and garbage may be NaN
        self.keys = [k.new_zeros((slots, k.shape[1], columns, k.shape[3])) for k, _ in kv]
        self.values = [v.new_zeros((slots, v.shape[1], columns, v.shape[3])) for _, v in kv]

    def _grow(self, slots: int, columns: int) -> None:
        n, width = len(self.rows), self.width
        for store in (self.keys, self.values):
            for i, old in enumerate(store):
                new = old.new_zeros((slots, old.shape[1], columns, old.shape[3]))
                new[:n, :, :width] = old[:n, :, :width]
                store[i] = new
