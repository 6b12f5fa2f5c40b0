"""Token selection inside the compiled step: greedy, or sampling by an exponential race.

Sampling draws e ~ Exp(1) per token and takes argmax(p / e), which selects token i with
probability p_i without `torch.multinomial` (that syncs with the host on CUDA).

The random numbers are a counter-based hash of (the sequence's key, its position, the token
id), not draws from torch's shared generator: a sequence's sampled tokens are then a function
of its seed and its own tokens. With a shared generator, a sequence whose decoding waits for a
verdict (`--max-held`) would let its neighbours consume the draws meanwhile, and its tokens,
and so the guard's checks, would depend on how long the verdict took. The hash is "lowbias32"
(C. Wellons) on int64 tensors kept below 2^49, so no product overflows on any backend.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from oc_engine.errors import OcEngineError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k and top_p restrict the candidates when sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not self.temperature >= 0:
            raise OcEngineError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise OcEngineError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise OcEngineError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


_MASK32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9  # added before hashing: lowbias32 maps 0 to 0


def _mul32(x: torch.Tensor, constant: int) -> torch.Tensor:
    """(x * constant) mod 2^32 for 0 <= x < 2^32, in two 16-bit halves (no int64 overflow)."""
    high, low = constant >> 16, constant & 0xFFFF
    return (x * low + (((x * high) & 0xFFFF) << 16)) & _MASK32


def hash32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = _mul32(x ^ (x >> 16), 0x7FEB352D)
    x = _mul32(x ^ (x >> 15), 0x846CA68B)
    return x ^ (x >> 16)


def sequence_keys(seed: int, count: int, device=None) -> torch.Tensor:
    """[count] int64: the key of each sequence of a request list, from the seed and its index."""
    index = torch.arange(count, dtype=torch.int64, device=device)
    return hash32(hash32(index + (seed & _MASK32) + _GOLDEN) ^ hash32(torch.full_like(index, (seed >> 32) + 1)))


def uniforms(keys: torch.Tensor, positions: torch.Tensor, vocab: int) -> torch.Tensor:
    """keys [B], positions [B] int64 -> [B, vocab] fp32 in (0, 1), one stream per (key, position)."""
    stream = hash32(keys ^ hash32(positions + _GOLDEN))  # [B]
    ids = torch.arange(vocab, dtype=torch.int64, device=keys.device)
    bits = hash32(hash32((stream[:, None] ^ ids[None, :]) + _GOLDEN) + stream[:, None])
    return ((bits >> 8).float() + 0.5) * (1.0 / 2 ** 24)


def sample(logits: torch.Tensor, config: SamplingConfig, keys: torch.Tensor | None = None,
           positions: torch.Tensor | None = None) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] (int64).

    keys [B] and positions [B] (int64) choose each row's random numbers (see the module
    docstring); without them, fresh keys are drawn from torch's generator."""
    if config.greedy:
        return logits.argmax(dim=-1)
    logits = logits / config.temperature
    if config.top_k is not None and config.top_k < logits.shape[-1]:
        kth = torch.topk(logits, config.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if config.top_p is not None and config.top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        sorted_probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the tokens ranked above it already hold top_p of the mass.
        drop_sorted = (sorted_probs.cumsum(dim=-1) - sorted_probs) > config.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    if keys is None:
        keys = torch.randint(0, 2 ** 32, (logits.shape[0],), dtype=torch.int64, device=logits.device)
    if positions is None:
        positions = torch.zeros_like(keys)
    race = -torch.log(uniforms(keys, positions, logits.shape[-1]))  # Exp(1)
    return (probs / race).argmax(dim=-1)
