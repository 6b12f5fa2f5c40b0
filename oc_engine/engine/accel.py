"""Everything that differs between CPU and CUDA, behind one switch.

The decode loop calls these few functions and is otherwise the same code on both:
- how the step is compiled (CUDA graphs via reduce-overhead on CUDA; plain inductor on CPU,
  where the runners' few-row matmuls become fused multiply-reduce loops, see `linear`);
- marking cache buffers as static addresses, so CUDA graphs can mutate them in place.
"""

from __future__ import annotations

import types
from typing import Callable

import torch


def compile_step(fn: Callable, device: torch.device, name: str | None = None) -> Callable:
    """Compile the per-token step: full graph, no host sync inside.

    The step is compiled as a copy of `fn` with a code object of its own (named `name`): dynamo
    keeps compiled graphs, and counts its recompile limit (8; past it `fullgraph=True` raises),
    per code object, and every runner's step is the same inner function. So models, dtypes,
    batch shapes and probe settings each get their own budget."""
    name = name or fn.__name__
    fn = types.FunctionType(fn.__code__.replace(co_name=name), fn.__globals__, name, fn.__defaults__,
                            fn.__closure__)
    if device.type == "cuda":
        return torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    return torch.compile(fn, fullgraph=True)


def probe_ema_op(device: torch.device) -> Callable:
    """What the compiled step scores the probe with (see `oc_engine.kernels.probe_ema`): the
    custom op on CUDA, one node that runs the Triton kernel inside the CUDA graph; on CPU its
    reference maths inline, which inductor fuses into the step's own loops. Through the op, CPU
    ran the reference eagerly after the graph, a dozen small operators per step: 5.6-6.2% per
    generated token, against none measurable inline (`bench/bench_probe_cost.py`)."""
    from oc_engine.kernels.probe_ema import probe_ema_reference

    return torch.ops.oc_engine.probe_ema if device.type == "cuda" else probe_ema_reference


def materialized(x: torch.Tensor) -> torch.Tensor:
    """`x` written to memory before a compiled few-row matmul reads it, not recomputed inside it.

    Inductor inlines a pointwise producer (the RMSNorm before q/k/v, SiLU(gate) * up before
    the down projection) into the multiply-and-sum loop that consumes it, so the producer is
    recomputed for every output row (3,072 times per input element in the gate-up projection),
    which halved the loop's speed. `as_strided` needs a real layout, so inductor writes `x` out once; eager and
    other compilers see a no-op view."""
    return torch.as_strided(x, x.shape, x.stride())


def mark_static(tensor: torch.Tensor) -> torch.Tensor:
    """Tell CUDA graphs that this buffer keeps its address across calls (the KV cache)."""
    if tensor.is_cuda:
        torch._dynamo.mark_static_address(tensor)
    return tensor


def synchronize(device: torch.device) -> None:
    """Wait for queued device work (used only at the edges, for timing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def default_output_lag(device: torch.device) -> int:
    """How many steps the host reads the step's outputs behind the device (see `StepReader`)."""
    return 1 if device.type == "cuda" else 0


class StepReader:
    """Brings each step's small outputs (token ids, probe score, EMA, flags) to the host.

    CUDA: `stage` queues non-blocking copies into pinned host buffers and records an event; the
    loop reads them `lag` steps later (`read` waits on that event, by then long done), so the
    host never stalls the device to learn a flag, and the next step is already queued while
    the host streams text. Safe because nothing is shown before the guard has seen the token's
    flags: a pause seen one step late only means one more token is held.
    CPU: the outputs are plain tensors, read directly (lag 0). A lag of 1 on CPU runs the same
    pipeline with copies, which is how the tests check it.
    """

    def __init__(self, device: torch.device, lag: int):
        if lag < 0:
            raise ValueError(f"output lag must be >= 0, got {lag}")
        self.device, self.lag = device, lag
        # Per batch size (each bucket's outputs have their own): pinned buffer sets, each with
        # its CUDA event (reused with it, not one per step), reused round-robin.
        self._rings: dict[int, tuple[list[list[torch.Tensor]], list, list[int]]] = {}

    def stage(self, tensors: list[torch.Tensor]):
        """Start the copies of `tensors` (each [B]); returns a handle for `read`."""
        if self.device.type != "cuda":
            return None, [t.clone() if self.lag else t for t in tensors]
        sets, events, turn = self._rings.setdefault(tensors[0].shape[0], ([], [], [0]))
        if len(sets) < self.lag + 1:
            sets.append([torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors])
            events.append(torch.cuda.Event())
        index = turn[0]
        slot, event = sets[index], events[index]
        turn[0] = (index + 1) % (self.lag + 1)
        for host, t in zip(slot, tensors):
            host.copy_(t, non_blocking=True)
        # Re-recording is safe: this set's previous step (of the same size) was staged at least
        # `lag + 1` steps ago, and the host reads every step `lag` steps after staging it.
        event.record()
        return event, slot

    @staticmethod
    def read(handle) -> list[list]:
        event, tensors = handle
        if event is not None:
            event.synchronize()
        return [t.tolist() for t in tensors]
