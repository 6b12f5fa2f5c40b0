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

import torch

from oc_engine.params import SamplingConfig  # noqa: F401  (re-exported: the step's sampling config)


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
    """logits [B, V] fp32 -> token ids [B] (int64), every row with the same `config`.

    keys [B] and positions [B] (int64) choose each row's random numbers (see the module
    docstring); without them, fresh keys are drawn from torch's generator."""
    if config.greedy:
        return logits.argmax(dim=-1)
    batch, vocab = logits.shape
    if keys is None:
        keys = torch.randint(0, 2 ** 32, (batch,), dtype=torch.int64, device=logits.device)
    if positions is None:
        positions = torch.zeros_like(keys)
    rows = RowSampling.filled(batch, logits.device, vocab)
    rows.set(slice(None), config, vocab)
    return sample_rows(logits, rows, keys, positions)


class RowSampling:
    """Per-row sampling parameters as device tensors, so rows with different parameters share one
    compiled step and changing them never recompiles: temperature [B] (0 = greedy), top_k [B]
    (the vocabulary size = no limit), top_p [B] (1 = no limit)."""

    def __init__(self, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p

    @classmethod
    def filled(cls, batch: int, device, vocab: int) -> "RowSampling":
        return cls(torch.zeros(batch, device=device), torch.full((batch,), vocab, dtype=torch.int64, device=device),
                   torch.ones(batch, device=device))

    def rows(self, start: int, stop: int) -> "RowSampling":
        """Rows [start, stop), as views (one slot's prefill, or a batch bucket of the step)."""
        return RowSampling(self.temperature[start:stop], self.top_k[start:stop], self.top_p[start:stop])

    def set(self, rows, config: SamplingConfig, vocab: int) -> None:
        self.temperature[rows] = config.temperature
        self.top_k[rows] = min(config.top_k or vocab, vocab)
        self.top_p[rows] = 1.0 if config.top_p is None else config.top_p


def sample_rows(logits: torch.Tensor, rows: RowSampling, keys: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B]: each row by its own parameters (greedy where its
    temperature is 0). One sort serves top-k and top-p: the k-th largest value is read from it,
    and masking below it keeps the order."""
    greedy = logits.argmax(dim=-1)
    sampled = rows.temperature > 0
    scaled = logits / torch.where(sampled, rows.temperature, 1.0)[:, None]
    sorted_logits, order = torch.sort(scaled, dim=-1, descending=True)
    kth = sorted_logits.gather(-1, (rows.top_k - 1)[:, None])
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    sorted_probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already hold top_p of the mass.
    drop = ((sorted_probs.cumsum(dim=-1) - sorted_probs) > rows.top_p[:, None]) & (rows.top_p < 1)[:, None]
    probs = sorted_logits.masked_fill(drop, float("-inf")).softmax(dim=-1)
    race = -torch.log(uniforms(keys, positions, logits.shape[-1])).gather(-1, order)  # Exp(1), in sorted order
    choice = order.gather(-1, (probs / race).argmax(dim=-1, keepdim=True))[:, 0]
    return torch.where(sampled, choice, greedy)
