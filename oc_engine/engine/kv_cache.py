"""A static KV cache owned by the engine, written by index at per-sequence positions.

Buffers are allocated once for `batch x max_len` and never change shape or address, so
the compiled decode step (and a CUDA graph) sees the same tensors every token. Positions
are device tensors: nothing here reads a value back to the host.
"""

from __future__ import annotations

import torch

from oc_engine.engine.accel import mark_static


class StaticKVCache:
    """Per-layer K and V buffers of shape [batch, kv_heads, max_len, head_dim].

    Layers are allocated on their first write (during the eager prefill), so one class
    serves models whose layers differ in head count or head size (Gemma 4), and layers
    that reuse another layer's K/V (Gemma 4's shared layers) cost nothing.
    """

    def __init__(self, batch: int, max_len: int, device: torch.device, dtype: torch.dtype):
        self.batch, self.max_len, self.device, self.dtype = batch, max_len, device, dtype
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._first_rows = {batch: CacheRows(self, slice(None))}  # n -> the view of rows [0, n)

    def rows(self, start: int, stop: int) -> "CacheRows":
        return CacheRows(self, slice(start, stop))

    def rows_at(self, slots: torch.Tensor) -> "CacheRows":
        """The rows of `slots` [B] (long), in that order: prompts of several slots prefilled together."""
        return CacheRows(self, slots)

    def first_rows(self, count: int) -> "CacheRows":
        """Rows [0, count) (a batch bucket of the step; all of them: `all_rows`), one object per
        count, so the compiled step sees the same input every call."""
        if count not in self._first_rows:
            self._first_rows[count] = self.rows(0, count)
        return self._first_rows[count]

    def all_rows(self) -> "CacheRows":
        return self._first_rows[self.batch]

    def _buffers(self, layer: int, kv_heads: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.keys:
            shape = (self.batch, kv_heads, self.max_len, head_dim)
            self.keys[layer] = mark_static(torch.zeros(shape, device=self.device, dtype=self.dtype))
            self.values[layer] = mark_static(torch.zeros(shape, device=self.device, dtype=self.dtype))
        return self.keys[layer], self.values[layer]


class CacheRows:
    """Some batch rows of a `StaticKVCache`: a range (the step's bucket, one prefilled slot) or
    the slots in a tensor (prompts prefilled together)."""

    def __init__(self, cache: StaticKVCache, rows: slice | torch.Tensor):
        self.cache, self.rows = cache, rows

    @property
    def max_len(self) -> int:
        return self.cache.max_len

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor, pos: torch.Tensor,
              span: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Store key/value [B, kv_heads, T, head_dim] at positions pos [B, T]; return the buffers
        to attend over: K, V [B, kv_heads, span or max_len, head_dim] for these rows. Positions
        not yet written hold zeros and are masked out by the caller. `span` (at least every
        live position + 1) bounds what attention reads: the whole cache costs more than the
        weights per token at long contexts."""
        keys, values = self.cache._buffers(layer, key.shape[1], key.shape[3])
        # Written by index into the whole buffer, not through a view of these rows: in the
        # compiled step, a batch bucket of one row that wrote through the view decoded at 0.77x
        # a one-slot engine with a 2,048-position cache (0.96x at 512), 0.98x written this way.
        if isinstance(self.rows, torch.Tensor):
            batch_index = self.rows[:, None].expand_as(pos)
        else:
            start = self.rows.start or 0
            batch_index = torch.arange(start, start + key.shape[0], device=pos.device)[:, None].expand_as(pos)
        # Advanced indices around a slice put [B, T] first: the value is [B, T, kv_heads, head_dim].
        keys[batch_index, :, pos] = key.transpose(1, 2).to(keys.dtype)
        values[batch_index, :, pos] = value.transpose(1, 2).to(values.dtype)
        if isinstance(self.rows, torch.Tensor):  # a gather: a copy of only the span's positions
            length = self.max_len if span is None else span
            return keys[self.rows, :, :length], values[self.rows, :, :length]
        if self.rows != slice(None):
            keys, values = keys[self.rows], values[self.rows]
        if span is not None:
            keys, values = keys[:, :, :span], values[:, :, :span]
        return keys, values
