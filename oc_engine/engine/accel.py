"""Everything that differs between CPU and CUDA, behind one switch.

The decode loop calls these few functions and is otherwise the same code on both:
- how the step is compiled (CUDA graphs via reduce-overhead on CUDA; plain inductor on CPU,
  where the runners' few-row matmuls become fused multiply-reduce loops, see `linear`);
- marking cache buffers as static addresses, so CUDA graphs can mutate them in place.
"""

from __future__ import annotations

from typing import Callable

import torch


def compile_step(fn: Callable, device: torch.device) -> Callable:
    """Compile the per-token step: full graph, no host sync inside."""
    if device.type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    return torch.compile(fn, fullgraph=True)


def mark_static(tensor: torch.Tensor) -> torch.Tensor:
    """Tell CUDA graphs that this buffer keeps its address across calls (the KV cache)."""
    if tensor.is_cuda:
        torch._dynamo.mark_static_address(tensor)
    return tensor


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (used only at the edges, for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
