"""What both runners share."""

from __future__ import annotations

import torch


def last_positions(x: torch.Tensor, last: torch.Tensor | None) -> torch.Tensor:
    """x [B, T, H] -> [B, H]: each row's position `last` [B], or the last one (None)."""
    if last is None:
        return x[:, -1]
    return x[torch.arange(x.shape[0], device=x.device), last]
