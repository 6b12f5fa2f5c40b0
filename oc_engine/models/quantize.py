"""Weight-only int8 and int4 quantization of a model's linear layers, on torch's own packed ops.

    int8  one scale per output row, symmetric: w ~ q * scale, q in [-127, 127].
          CPU: aten._weight_int8pack_mm, except one row inside the compiled step, which
          inductor multiplies and sums (`int8_gemv`). CUDA: the int8 weight cast inside the
          matmul (gpt-fast's form, which inductor fuses).
    int4  one scale and one offset per group of INT4_GROUP inputs in a row, like GGUF's Q4_1:
          w ~ (q - 8) * scale + zero, q in [0, 15].
          CPU: aten._weight_int4pack_mm_for_cpu. CUDA: aten._weight_int4pack_mm (tinygemm).

Why these ops and not torchao: on the CPU torchao's weight-only configs end in these same aten
kernels, and its tensor subclasses would wrap the fused runner's weights in another layer of
dispatch inside the compiled step; the ops themselves trace into the graph as extern kernels.

Every row is quantized on its own, so quantizing q, k and v apart and concatenating the rows
gives exactly what quantizing the fused weight would: Hugging Face's modules (used to collect
probe activations) and the fused runner see the same quantized model. Activations, norms,
attention, the KV cache and the input embeddings stay in the model's dtype.
"""

from __future__ import annotations

import torch
from torch import nn

from oc_engine.config import check_quantization
from oc_engine.engine.accel import materialized
from oc_engine.errors import OcEngineError

QUANTIZER_VERSION = 1  # bump when the codes a weight gets change (cached activations are keyed by it)
INT4_GROUP = 32  # inputs per scale/offset pair: Q4_1's block size
INT4_CPU_BLOCK_ROWS = 64  # the CPU int4 packing interleaves rows in blocks of this many
INT4_CUDA_TILE_ROWS = 8  # tinygemm's packed weight is [N / 8, ...]: tiles of 8 rows
# The output head's error reaches every logit directly, so under int4 it stays int8, as 4-bit
# GGUF files keep it at 8 or 6 bits (the embedded model's Q4_1 file has it at Q8_0).
HEAD_SCHEME = {"int8": "int8", "int4": "int8"}


class QuantizedLinear(nn.Module):
    """A linear layer whose weight is stored quantized; forward(x [..., K]) -> [..., N].

    data: int8 [N, K] (int8); uint8 [N, K/2] (int4 on the CPU) or int32 tinygemm tiles (CUDA).
    scales: [N] (int8) or [K/G, N, 2] scale and zero (int4), in the activations' dtype."""

    def __init__(self, scheme: str, data: torch.Tensor, scales: torch.Tensor, in_features: int, out_features: int,
                 bias: torch.Tensor | None = None):
        super().__init__()
        self.scheme, self.in_features, self.out_features = scheme, in_features, out_features
        self.register_buffer("data", data)
        self.register_buffer("scales", scales)
        self.register_buffer("bias", bias)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, scheme: str, bias: torch.Tensor | None = None) -> "QuantizedLinear":
        """weight [N, K] float, on the device it will run on."""
        out_features, in_features = weight.shape
        check_shape(scheme, out_features, in_features, weight.device)
        data, scales = (quantize_int8 if scheme == "int8" else quantize_int4)(weight.detach())
        bias = None if bias is None else bias.detach().clone()
        return cls(scheme, data, scales, in_features, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.matmul(x)
        return out if self.bias is None else out + self.bias

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] -> x @ W.T [..., N] in x's dtype (no bias)."""
        flat = x.reshape(-1, self.in_features)
        if self.scheme == "int8":
            if flat.shape[0] == 1 and flat.device.type == "cpu" and torch.compiler.is_compiling():
                out = int8_gemv(flat, self.data, self.scales)
            elif flat.device.type == "cpu":
                out = torch.ops.aten._weight_int8pack_mm(flat, self.data, self.scales)
            else:
                out = torch.nn.functional.linear(flat, self.data.to(flat.dtype)) * self.scales
        elif flat.device.type == "cpu":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.data, INT4_GROUP, self.scales)
        else:
            out = torch.ops.aten._weight_int4pack_mm(flat, self.data, INT4_GROUP, self.scales)
        return out.reshape(*x.shape[:-1], self.out_features)

    def dequantized(self) -> torch.Tensor:
        """The weight [N, K] this layer multiplies by, in the scales' dtype (the reference)."""
        if self.scheme == "int8":
            return self.data.to(self.scales.dtype) * self.scales[:, None]
        eye = torch.eye(self.in_features, dtype=self.scales.dtype, device=self.data.device)
        return self.matmul(eye).t().contiguous()

    def rows(self, start: int, stop: int) -> "QuantizedLinear":
        """Rows [start, stop) as a layer sharing this one's weight memory (int4: at block boundaries)."""
        data = self.data[start:stop]
        if self.scheme == "int4":
            block = _int4_block_rows(self.data.device)
            if start % block or stop % block:
                raise OcEngineError(f"int4 rows can be split only at {block}-row blocks")
            if self.data.device.type != "cpu":  # tinygemm's first dimension counts tiles of rows
                data = self.data[start // block:stop // block]
            scales = self.scales[:, start:stop].contiguous()  # small; the kernel reads it densely
        else:
            scales = self.scales[start:stop]
        bias = None if self.bias is None else self.bias[start:stop]
        return QuantizedLinear(self.scheme, data, scales, self.in_features, stop - start, bias)

    @staticmethod
    def cat(parts: list["QuantizedLinear"]) -> "QuantizedLinear":
        """One layer whose output rows are the parts' rows in order (the fused projections)."""
        first = parts[0]
        if any(p.scheme != first.scheme or p.in_features != first.in_features for p in parts):
            raise OcEngineError("cannot fuse linear layers quantized differently")
        block = _int4_block_rows(first.data.device)
        if first.scheme == "int4" and (any(p.out_features % block for p in parts)
                                       or len({p.data.shape[1:] for p in parts}) > 1):
            raise OcEngineError(f"int4 layers fuse only in whole {block}-row blocks of one packing")
        data = torch.cat([p.data for p in parts])
        scales = torch.cat([p.scales for p in parts], dim=0 if first.scheme == "int8" else 1)
        has_bias = first.bias is not None
        bias = torch.cat([p.bias for p in parts]) if has_bias else None
        return QuantizedLinear(first.scheme, data, scales, first.in_features, sum(p.out_features for p in parts), bias)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.data, self.scales))

    def extra_repr(self) -> str:
        return f"{self.scheme}, in_features={self.in_features}, out_features={self.out_features}"


def int8_gemv(x: torch.Tensor, data: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [1, K] @ (data [N, K] int8 * scales [N]).T -> [1, N] in x's dtype, as multiply-and-sum.

    Why: at one row aten's int8 kernel streams the weight at about 9-10 GB/s on this 2-core
    CPU, slower than the bf16 multiply-and-sum (about 20 GB/s) over twice the bytes; inductor's
    loop over the int8 weight, its input written out first (`materialized`), streamed 18 GB/s
    over the decoder's int8 layers in a micro-benchmark, and makes int8 decode 0.78x as long per
    token (fp32 accumulation either way; `bench/results/runs/2026-12-07-gemv-input-written-out`)."""
    x = materialized(x)
    return ((x.float()[:, None, :] * data.float()).sum(-1) * scales.float()).to(x.dtype)


def _int4_block_rows(device: torch.device) -> int:
    """Rows packed together by int4's kernels: whole blocks can be cut and concatenated."""
    return INT4_CPU_BLOCK_ROWS if device.type == "cpu" else INT4_CUDA_TILE_ROWS


def check_shape(scheme: str, out_features: int, in_features: int, device: torch.device) -> None:
    if scheme == "int4":
        rows = _int4_block_rows(device)
        if in_features % INT4_GROUP or out_features % rows:
            raise OcEngineError(f"int4 needs layers whose inputs are a multiple of {INT4_GROUP} and outputs a "
                                f"multiple of {rows}; this model has a {out_features}x{in_features} layer "
                                f"(--quantize int8 has no such limit)")


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int8 [N, K], scales [N] in weight's dtype)."""
    w = weight.float()
    scales = _stored((w.abs().amax(dim=1) / 127).clamp(min=1e-8), weight.dtype)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales.to(weight.dtype)


def int4_codes(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (q int32 [N, K] in [0, 15], scale [N, K/G], zero [N, K/G]) with
    w ~ (q - 8) * scale + zero: Q4_1's minimum-and-step, stated as tinygemm's offset."""
    n, k = weight.shape
    parts = [_int4_rows(weight[start:start + 4096]) for start in range(0, n, 4096)]
    return tuple(torch.cat(p) for p in zip(*parts))


def _int4_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """int4_codes for a few thousand rows. Each group's step is the one, among its range split
    into 15 down to 8 steps, with the least squared error: a group whose values use only part
    of a 16-level grid (weights that were already 4-bit, like the embedded model's Q4_1) gets
    that grid back instead of a finer, misaligned one."""
    n, k = weight.shape
    w = weight.float().reshape(n, k // INT4_GROUP, INT4_GROUP)
    low, high = w.amin(dim=-1), w.amax(dim=-1)
    best = None
    for levels in range(15, 7, -1):
        scale = _stored(((high - low) / levels).clamp(min=1e-8), weight.dtype)
        zero = _stored(low + 8 * scale, weight.dtype)
        q = torch.round((w - (zero - 8 * scale)[..., None]) / scale[..., None]).clamp(0, 15)
        error = ((q - 8) * scale[..., None] + zero[..., None] - w).square().sum(-1)
        if best is None:
            best = [error, q, scale, zero]
        else:
            better = error < best[0]
            best = [torch.where(better, error, best[0]), torch.where(better[..., None], q, best[1]),
                    torch.where(better, scale, best[2]), torch.where(better, zero, best[3])]
    _, q, scale, zero = best
    return q.to(torch.int32).reshape(n, k), scale, zero


def _stored(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`values` as the kernel will read them (rounded to `dtype`), in fp32: the codes are chosen
    against the scales that are stored, not the exact ones (in bf16 a zero point moves by up to
    0.4% of itself when stored, which can be a large part of a step)."""
    return values.to(dtype).float()


def quantize_int4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] -> (packed data, scales_and_zeros [K/G, N, 2] in weight's dtype)."""
    q, scale, zero = int4_codes(weight)
    scales_and_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous().to(weight.dtype)
    if weight.device.type == "cpu":
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1), scales_and_zeros
    packed = (q[:, ::2] << 4 | q[:, 1::2]).to(torch.uint8)
    k = weight.shape[1]
    inner_k_tiles = next(t for t in (8, 4, 2) if k % (t * 16) == 0)  # tinygemm: K a multiple of 16 per tile
    return torch.ops.aten._convert_weight_to_int4pack(packed, inner_k_tiles), scales_and_zeros


def quantize_model(model: nn.Module, scheme: str | None) -> str | None:
    """Replace the decoder's linear layers and the output head by QuantizedLinear, in place.

    The head is quantized as HEAD_SCHEME says; a tied head gets its own quantized copy. The
    input embeddings stay in the model's dtype (a row lookup streams almost nothing). Returns
    the scheme, recorded on the model (`model.oc_engine_quantization`), which the probe's
    fingerprint reads."""
    scheme = check_quantization(scheme)
    if scheme is None:
        return None
    if getattr(model, "oc_engine_quantization", None) is not None:
        raise OcEngineError(f"the model is already quantized ({model.oc_engine_quantization})")
    device = model.get_output_embeddings().weight.device
    if device.type not in ("cpu", "cuda"):
        raise OcEngineError(f"--quantize {scheme} runs on the CPU or CUDA, not {device.type}")
    if scheme == "int4" and device.type == "cuda" and next(model.parameters()).dtype != torch.bfloat16:
        raise OcEngineError("--quantize int4 on CUDA needs --dtype bfloat16 (tinygemm's only dtype)")
    targets = [(name, module) for name, module in model.get_decoder().named_modules() if isinstance(module, nn.Linear)]
    for name, module in targets:  # check every shape before changing anything
        check_shape(scheme, module.out_features, module.in_features, device)
    head = model.get_output_embeddings()
    decoder = model.get_decoder()
    for name, module in targets:
        _replace(decoder, name, QuantizedLinear.from_weight(module.weight, scheme, module.bias))
    quantized_head = QuantizedLinear.from_weight(head.weight, HEAD_SCHEME[scheme], head.bias)
    model.set_output_embeddings(quantized_head)
    model.config.tie_word_embeddings = False  # the head is its own (quantized) tensor now
    model.oc_engine_quantization = scheme
    return scheme


def model_quantization(model: nn.Module) -> str | None:
    return getattr(model, "oc_engine_quantization", None)


def linear_weight_bytes(model: nn.Module) -> int:
    """Bytes every decode step streams for the decoder's linear layers and the output head."""
    total = 0
    for module in list(model.get_decoder().modules()) + [model.get_output_embeddings()]:
        if isinstance(module, QuantizedLinear):
            total += module.nbytes()
        elif isinstance(module, nn.Linear):
            total += module.weight.numel() * module.weight.element_size()
    return total


def _replace(root: nn.Module, dotted: str, new: nn.Module) -> None:
    parent_name, _, child = dotted.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)
