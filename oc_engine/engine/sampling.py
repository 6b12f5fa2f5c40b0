"""Token selection inside the compiled step: greedy, or sampling by an exponential race.

Sampling draws u ~ Exp(1) per token and takes argmax(p / u), which selects token i with
probability p_i without `torch.multinomial` (that syncs with the host on CUDA).
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


def sample(logits: torch.Tensor, config: SamplingConfig) -> torch.Tensor:
    """logits [B, V] fp32 -> token ids [B] (int64)."""
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
    race = torch.empty_like(probs).exponential_(1)
    return (probs / race).argmax(dim=-1)
