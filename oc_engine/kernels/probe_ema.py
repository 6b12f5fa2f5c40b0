"""Fused probe score + EMA update: one Triton kernel, its PyTorch reference, and the custom op.

For each sequence b of the batch, with tapped hidden states from one or more layers:

    logit[b] = sum_l <hidden[l, b, :], weight[l, :]> + bias        (accumulated in fp32)
    score[b] = sigmoid(logit[b]), or NaN when the logit is not finite
    bad[b]   = score[b] or the old ema[b] is not finite
    ema[b]   = ema[b] if bad[b] else (score[b] if ema[b] < 0 else alpha * score[b] + (1 - alpha) * ema[b])
    flags[b] = 7 if bad[b] else 1 * (ema[b] >= warn) + 2 * (ema[b] >= pause)

Fail closed on non-finite numbers: an inf or NaN in the tapped hidden states (fp16 overflow,
say) or in the probe makes a non-finite logit, which scores NaN (sigmoid(+-inf) would look
like a confident 1 or 0). NaN compares false with every threshold, so without `bad` the token
would stream unjudged, and a NaN EMA would silence the probe for good. A bad token sets every
flag (4: non-finite, which the guard treats as a pause whatever its cadence) and leaves the EMA
as it was, so the probe goes on scoring the next tokens.

Shapes: hidden [L, B, H] (bf16, fp16 or fp32; H any size), weight [L, H] fp32, bias [1] fp32,
ema [B] fp32 (a negative value means "no score yet"), thresholds [3] fp32 = (alpha, warn,
pause); returns score [B] fp32 and flags [B] int32. Thresholds live in a tensor so that
changing them never recompiles the step.

`torch.ops.oc_engine.probe_ema` is a custom op: torch.compile keeps it as one node of the
step's graph (no graph break), captured in the CUDA graph on CUDA, where the Triton kernel
runs; on CPU the reference runs in its place.
"""

from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # triton is optional off Linux; the reference serves CPU
    triton = None


def probe_ema_reference(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ema: torch.Tensor,
                        thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain PyTorch, the same maths as the kernel; updates `ema` in place."""
    # A multiply-and-sum, not einsum: inside the compiled CPU step (accel.probe_ema_op) inductor
    # fuses it into one loop, where einsum would become a separate batched matmul call.
    logit = (hidden.float() * weight.float()[:, None, :]).sum(dim=(0, 2)) + bias.float()
    score = score_of_logit(logit)
    new_ema, flags = ema_update(score, ema, thresholds[0], thresholds[1], thresholds[2])
    ema.copy_(new_ema)
    return score, flags


def score_of_logit(logit: torch.Tensor) -> torch.Tensor:
    """sigmoid, NaN where the logit is not finite (see the module docstring)."""
    return torch.where(torch.isfinite(logit), torch.sigmoid(logit), torch.full_like(logit, float("nan")))


def ema_update(score: torch.Tensor, ema: torch.Tensor, alpha, warn, pause) -> tuple[torch.Tensor, torch.Tensor]:
    """(new ema, flags) for scores [B] and the EMAs before them [B]; alpha, warn and pause are
    scalars or [B] tensors (per-row settings, as the vLLM plugin keeps them)."""
    bad = ~torch.isfinite(score) | ~torch.isfinite(ema)
    new_ema = torch.where(bad, ema, torch.where(ema < 0, score, alpha * score + (1 - alpha) * ema))
    flags = (new_ema >= warn).to(torch.int32) + 2 * (new_ema >= pause).to(torch.int32)
    return new_ema, torch.where(bad, torch.full_like(flags, 7), flags)


if triton is not None:
    _FLT_MAX = tl.constexpr(3.4028234663852886e38)

    @triton.jit
    def _probe_ema_kernel(hidden_ptr, weight_ptr, bias_ptr, ema_ptr, thresholds_ptr, score_ptr, flags_ptr,
                          stride_hl, stride_hb, stride_wl,
                          NUM_LAYERS: tl.constexpr, HIDDEN_SIZE: tl.constexpr, BLOCK: tl.constexpr):
        # The layer count and width are fixed per model, so they are compile-time constants: the
        # compiler knows the trip counts, and triton 3.6's interpreter (under numpy >= 2.4) cannot
        # take a runtime scalar as a loop bound at all.
        b = tl.program_id(0)
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for layer in range(0, NUM_LAYERS):
            for start in range(0, HIDDEN_SIZE, BLOCK):
                offs = start + tl.arange(0, BLOCK)
                mask = offs < HIDDEN_SIZE
                h = tl.load(hidden_ptr + layer * stride_hl + b * stride_hb + offs, mask=mask, other=0.0)
                w = tl.load(weight_ptr + layer * stride_wl + offs, mask=mask, other=0.0)
                acc += h.to(tl.float32) * w.to(tl.float32)
        logit = tl.sum(acc, axis=0) + tl.load(bias_ptr).to(tl.float32)
        # |x| <= FLT_MAX is false for inf and NaN alike: the finiteness test in one comparison.
        # A non-finite logit scores NaN (logit - logit is NaN exactly when the logit is not finite).
        score = tl.where(tl.abs(logit) <= _FLT_MAX, 1.0 / (1.0 + tl.exp(-logit)), logit - logit)
        alpha = tl.load(thresholds_ptr)
        warn = tl.load(thresholds_ptr + 1)
        pause = tl.load(thresholds_ptr + 2)
        old = tl.load(ema_ptr + b)
        ok = (tl.abs(score) <= _FLT_MAX) & (tl.abs(old) <= _FLT_MAX)
        new = tl.where(ok, tl.where(old < 0.0, score, alpha * score + (1.0 - alpha) * old), old)
        tl.store(ema_ptr + b, new)
        tl.store(score_ptr + b, score)
        flags = (new >= warn).to(tl.int32) + 2 * (new >= pause).to(tl.int32)
        tl.store(flags_ptr + b, tl.where(ok, flags, 7))


def probe_ema_triton(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ema: torch.Tensor,
                     thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (CUDA, or CPU tensors under TRITON_INTERPRET=1)."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    num_layers, batch, hidden_size = hidden.shape
    if hidden.stride(2) != 1:
        hidden = hidden.contiguous()
    weight = weight.contiguous()
    score = torch.empty(batch, device=hidden.device, dtype=torch.float32)
    flags = torch.empty(batch, device=hidden.device, dtype=torch.int32)
    block = min(1024, triton.next_power_of_2(hidden_size))
    _probe_ema_kernel[(batch,)](hidden, weight, bias, ema, thresholds, score, flags,
                                hidden.stride(0), hidden.stride(1), weight.stride(0),
                                NUM_LAYERS=num_layers, HIDDEN_SIZE=hidden_size, BLOCK=block)
    return score, flags


@torch.library.custom_op("oc_engine::probe_ema", mutates_args=("ema",))
def probe_ema(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, ema: torch.Tensor,
              thresholds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The op the decode step calls: Triton on CUDA, the reference elsewhere."""
    if hidden.is_cuda and triton is not None:
        return probe_ema_triton(hidden, weight, bias, ema, thresholds)
    return probe_ema_reference(hidden, weight, bias, ema, thresholds)


@probe_ema.register_fake
def _(hidden, weight, bias, ema, thresholds):
    batch = hidden.shape[1]
    return (hidden.new_empty(batch, dtype=torch.float32), hidden.new_empty(batch, dtype=torch.int32))
