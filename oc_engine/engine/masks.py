"""Additive attention masks built from per-sequence positions (device tensors, no host sync)."""

from __future__ import annotations

import torch


def attention_mask(pos: torch.Tensor, max_len: int, dtype: torch.dtype, window: int | None = None) -> torch.Tensor:
    """Mask for queries at positions pos [B, T] over a cache of max_len slots.

    Returns [B, 1, T, max_len]: 0 where a query may attend, the dtype's minimum elsewhere.
    A query at position p sees slots 0..p, or with a sliding window W the slots p-W+1..p
    (the rule Hugging Face uses: kv > q - W).
    """
    slots = torch.arange(max_len, device=pos.device)
    query = pos[:, :, None]
    allowed = slots[None, None, :] <= query
    if window is not None:
        allowed = allowed & (slots[None, None, :] > query - window)
    zero = torch.zeros((), dtype=dtype, device=pos.device)
    neg = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=pos.device)
    return torch.where(allowed, zero, neg)[:, None]
