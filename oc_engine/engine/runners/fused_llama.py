"""A compact forward for the Llama family (Llama, SmolLM2, Mistral without sliding window,
Qwen2, Qwen3) with fused projections, reading the Hugging Face model's own weights.

Why not run Hugging Face's modules: per token they launch q, k and v (and gate and up) as
separate matmuls and rebuild masks and cache bookkeeping in Python. Here each layer is two
fused matmuls in, two out, and the static cache is written by index. The fused weights are
allocated once and the Hugging Face parameters are re-pointed at views of them, so nothing
is stored twice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from oc_engine.engine.accel import materialized
from oc_engine.engine.kv_cache import CacheRows
from oc_engine.engine.masks import attention_mask
from oc_engine.engine.runners.common import last_positions
from oc_engine.models.quantize import QuantizedLinear

FUSED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"}


def supports_fused(model: nn.Module) -> bool:
    """True for the architectures above when every layer is full attention with SiLU."""
    config = model.config
    if type(model).__name__ not in FUSED_ARCHITECTURES or getattr(config, "hidden_act", "silu") != "silu":
        return False
    if getattr(config, "use_sliding_window", False):
        return False
    if type(model).__name__ == "MistralForCausalLM" and getattr(config, "sliding_window", None):
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """Hugging Face's LlamaRMSNorm, op for op (fp32 statistics, cast back before the weight)."""
    dtype = x.dtype
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, heads, T, D]; cos, sin [B, T, D]."""
    cos, sin = cos[:, None], sin[:, None]
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def linear(x: torch.Tensor, weight: torch.Tensor | QuantizedLinear, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear, or the quantized layer's packed matmul, except for one or two rows on CPU
    inside torch.compile with a float weight.

    Decoding multiplies one row per sequence by each weight: a GEMV bound by how fast the
    weight streams from memory. Written as multiply-and-sum over an input that is written out
    first (`materialized`), inductor emits one vectorised loop that streams the weight about
    twice as fast as oneDNN's bf16 GEMV at one row (30 layers of 3072x576: 4.4 against 9.5 ms);
    at two rows they tie, and from four rows on oneDNN's GEMM wins (15.4 against 9.7 ms at
    four). fp32 accumulation either way.
    """
    if isinstance(weight, QuantizedLinear):
        out = weight.matmul(x)
        return out if bias is None else out + bias
    rows = x.numel() // x.shape[-1]
    if rows <= 2 and x.device.type == "cpu" and torch.compiler.is_compiling():
        x = materialized(x)
        out = (x.unsqueeze(-2).float() * weight.float()).sum(-1)
        if bias is not None:
            out = out + bias.float()
        return out.to(x.dtype)
    return F.linear(x, weight, bias)


def decode_attention(q, keys, values, mask, scale: float, bounded: bool = False) -> torch.Tensor:
    """Attention for one query per sequence, as plain ops that inductor fuses.

    q [B, H, 1, D], keys/values [B, KV, L, D], mask [B, 1, 1, L] -> [B, H, 1, D]. The query
    heads of one KV head are stacked as rows, so grouped-query attention needs no copy of
    K/V; softmax runs in fp32 like Hugging Face's eager attention. On CPU this is several
    times cheaper per layer than the flash kernel's fixed cost at this size.
    bounded: keys/values are the cache's first `span` positions, a strided view whose length
    is a symbol when compiled; a matmul would fold it and fail on (or pin) that symbol, so the
    same contractions are written as multiply-and-sum, which inductor emits as one loop each.
    """
    batch, heads, _, dim = q.shape
    kv_heads = keys.shape[1]
    q = q.reshape(batch, kv_heads, heads // kv_heads, dim)
    if bounded and torch.compiler.is_compiling():
        # Written out first: inductor would otherwise inline q's RoPE (a cos and a sin per
        # element) into the loop over keys, once per cached position; at 16 rows and a 256-
        # position span that loop was 20 ms of a 31 ms step.
        q = materialized(q)
        scores = (q[:, :, :, None, :] * keys[:, :, None]).sum(-1, dtype=torch.float32) * scale + mask
        probs = scores.softmax(dim=-1).to(q.dtype)
        out = (probs[..., None] * values[:, :, None]).sum(-2, dtype=torch.float32).to(q.dtype)
    else:
        scores = torch.matmul(q, keys.transpose(-1, -2)) * scale + mask
        probs = scores.float().softmax(dim=-1).to(q.dtype)
        out = torch.matmul(probs, values)
    return out.reshape(batch, heads, 1, dim)


def _fuse(modules: list[nn.Linear]) -> tuple[nn.Parameter | QuantizedLinear, nn.Parameter | None]:
    """Concatenate the weights (and biases) of `modules` along the output dim; re-point the
    modules' parameters at views of the fused tensor so memory is not doubled."""
    if isinstance(modules[0], QuantizedLinear):
        return _fuse_quantized(modules)
    weight = nn.Parameter(torch.cat([m.weight.detach() for m in modules]), requires_grad=False)
    has_bias = modules[0].bias is not None
    bias = nn.Parameter(torch.cat([m.bias.detach() for m in modules]), requires_grad=False) if has_bias else None
    start = 0
    for m in modules:
        n = m.weight.shape[0]
        m.weight = nn.Parameter(weight.detach()[start:start + n], requires_grad=False)
        if has_bias:
            m.bias = nn.Parameter(bias.detach()[start:start + n], requires_grad=False)
        start += n
    return weight, bias


def _fuse_quantized(modules: list[QuantizedLinear]) -> tuple[QuantizedLinear, torch.Tensor | None]:
    """The same for quantized layers: the fused layer carries no bias (returned apart, as above)."""
    fused = QuantizedLinear.cat(modules)
    bias, fused.bias = fused.bias, None
    start = 0
    for m in modules:
        view = fused.rows(start, start + m.out_features)
        m.data, m.scales = view.data, view.scales
        start += m.out_features
    return fused, bias


def _weight(module: nn.Module) -> torch.Tensor | QuantizedLinear:
    """What `linear` multiplies by: the weight, or the quantized layer itself."""
    return module if isinstance(module, QuantizedLinear) else module.weight


class FusedLayer(nn.Module):
    def __init__(self, hf_layer: nn.Module, config, index: int):
        super().__init__()
        attn, mlp = hf_layer.self_attn, hf_layer.mlp
        self.index = index
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.scaling = attn.scaling
        self.eps = config.rms_norm_eps
        self.wqkv, self.bqkv = _fuse([attn.q_proj, attn.k_proj, attn.v_proj])
        self.wo = _weight(attn.o_proj)
        self.bo = attn.o_proj.bias
        self.w_gate_up, _ = _fuse([mlp.gate_proj, mlp.up_proj])
        self.w_down = _weight(mlp.down_proj)
        self.input_norm = hf_layer.input_layernorm.weight
        self.post_norm = hf_layer.post_attention_layernorm.weight
        self.q_norm = attn.q_norm.weight if hasattr(attn, "q_norm") else None
        self.k_norm = attn.k_norm.weight if hasattr(attn, "k_norm") else None
        self.intermediate = mlp.gate_proj.out_features

    def forward(self, x, cos, sin, mask, pos, cache: CacheRows, span=None):
        batch, length, _ = x.shape
        h = rms_norm(x, self.input_norm, self.eps)
        qkv = linear(h, self.wqkv, self.bqkv)
        q, k, v = qkv.split([self.heads * self.head_dim, self.kv_heads * self.head_dim,
                             self.kv_heads * self.head_dim], dim=-1)
        q = q.view(batch, length, self.heads, self.head_dim)
        k = k.view(batch, length, self.kv_heads, self.head_dim)
        v = v.view(batch, length, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:  # Qwen3: per-head RMSNorm before RoPE
            q = rms_norm(q, self.q_norm, self.eps)
            k = rms_norm(k, self.k_norm, self.eps)
        q = apply_rope(q.transpose(1, 2), cos, sin)
        k = apply_rope(k.transpose(1, 2), cos, sin)
        keys, values = cache.write(self.index, k, v, pos, span)
        if length == 1:
            out = decode_attention(q, keys, values, mask, self.scaling, bounded=span is not None)
        else:
            out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scaling,
                                                 enable_gqa=self.heads != self.kv_heads)
        x = x + linear(out.transpose(1, 2).reshape(batch, length, -1), self.wo, self.bo)
        h = rms_norm(x, self.post_norm, self.eps)
        gate, up = linear(h, self.w_gate_up).split(self.intermediate, dim=-1)
        return x + linear(F.silu(gate) * up, self.w_down)


class FusedLlamaRunner(nn.Module):
    """forward(input_ids [B, T], pos [B, T], cache, taps, span) -> (logits [B, V] fp32,
    tapped [len(taps), B, H] | None).

    Logits and tapped states are for the last position only, or for each row's `last` [B]
    (prompts of different lengths padded to one batch). `taps` index Hugging Face's
    `output_hidden_states` (0 = embeddings, L = after the final norm), already normalised.
    `span`: attend over the cache's first `span` positions only (None: all of it).
    """

    supports_span = True

    def __init__(self, model: nn.Module):
        super().__init__()
        config = model.config
        base = model.model
        self.num_layers = config.num_hidden_layers
        self.embed = base.embed_tokens
        self.rotary = base.rotary_emb
        self.layers = nn.ModuleList(FusedLayer(layer, config, i) for i, layer in enumerate(base.layers))
        self.norm = base.norm.weight
        self.eps = config.rms_norm_eps
        self.lm_head = _weight(model.get_output_embeddings())

    def forward(self, input_ids, pos, cache: CacheRows, taps: tuple[int, ...] = (), span=None, last=None):
        x = self.embed(input_ids)
        cos, sin = self.rotary(x, pos)
        mask = attention_mask(pos, cache.max_len if span is None else span, x.dtype)
        tapped = {0: last_positions(x, last)} if 0 in taps else {}
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, pos, cache, span)
            if i + 1 in taps and i + 1 != self.num_layers:
                tapped[i + 1] = last_positions(x, last)
        x = rms_norm(last_positions(x, last), self.norm, self.eps)
        if self.num_layers in taps:
            tapped[self.num_layers] = x
        logits = linear(x, self.lm_head).float()
        return logits, (torch.stack([tapped[t] for t in taps]) if taps else None)
