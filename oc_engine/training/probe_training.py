"""Train a linear probe (unsafe_compliance vs the rest) on collected activations.

Objective, per token ("ema", the default with per-token activations): the guard pauses when
the EMA of per-token probabilities first reaches the pause threshold, that is when its
running peak does, so training optimises that peak. For each exchange, s_t = sigmoid(w.h_t +
b), ema_0 = s_0, ema_t = alpha s_t + (1 - alpha) ema_{t-1} (the kernel's update), and the loss
is the binary cross-entropy of max_t ema_t against the exchange's label, averaged over
exchanges with class-balanced weights. Why the EMA (not a sliding-window mean): it is what
runs at inference, so trained scores land where the thresholds apply. Why the peak (not
every token): unsafe answers often open innocuously ("Sure, here is"), and asking every early
token to look unsafe teaches the bias instead of the direction (on synthetic data where the
signal starts at token 4: AUROC 0.966 per-token vs 0.999 peak, the oracle 0.996); a safe
answer's peak must stay low, which keeps all its tokens low.
With final-token activations ("final"), it is plain logistic regression on that token.

Features are standardised on the training rows and the scaling is folded back into the
weight and bias, so the saved probe applies to raw hidden states (what the kernel reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from oc_engine.data import UNSAFE
from oc_engine.errors import OcEngineError
from oc_engine.training.activations import Activations


@dataclass(frozen=True)
class ProbeTrainConfig:
    alpha: float = 0.3
    weight_decay: float = 1e-2
    steps: int = 300
    learning_rate: float = 5e-3
    balance: bool = True
    seed: int = 0

    def __post_init__(self):
        if not 0 < self.alpha <= 1:
            raise OcEngineError(f"alpha must be in (0, 1], got {self.alpha}")
        if self.steps < 1 or self.weight_decay < 0:
            raise OcEngineError("steps must be >= 1 and weight decay >= 0")


def ema_traces(logits: torch.Tensor, mask: torch.Tensor, alpha: float) -> torch.Tensor:
    """logits [E, T] -> EMA of sigmoid scores [E, T] (the kernel's update; invalid rows repeat)."""
    scores = torch.sigmoid(logits)
    out = torch.empty_like(scores)
    ema = scores[:, 0]
    out[:, 0] = ema
    for t in range(1, scores.shape[1]):
        ema = torch.where(mask[:, t], alpha * scores[:, t] + (1 - alpha) * ema, ema)
        out[:, t] = ema
    return out


def probe_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """features [E, T, L, H], weight [L, H], bias [1] -> logits [E, T] (fp32)."""
    return torch.einsum("etlh,lh->et", features.float(), weight.float()) + bias.float()


def fit_probe(train: Activations, config: ProbeTrainConfig, *, progress: bool = False,
              init: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (weight [L, H], bias [1]) in fp32 for raw hidden states.

    init: a probe (weight [L, H], bias [1], raw hidden states) to start from instead of zeros."""
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)
    x = train.features.float()  # [E, T, L, H]
    mask = train.mask
    y = (train.labels == UNSAFE).float()
    if y.sum() == 0 or y.sum() == len(y):
        raise OcEngineError("probe training needs both unsafe_compliance and other exchanges")
    valid = x[mask]  # [N, L, H]
    mean, std = valid.mean(0), valid.std(0).clamp_min(1e-6)
    x = (x - mean) / std
    x[~mask] = 0
    if init is None:
        weight, bias = torch.zeros(x.shape[2], x.shape[3]), torch.zeros(1)
    else:  # the same probe on standardised features
        weight = init[0].float() * std
        bias = init[1].float().reshape(1) + (init[0].float() * mean).sum()
    weight, bias = weight.clone().requires_grad_(True), bias.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([weight, bias], lr=config.learning_rate)
    positives = y.sum()
    exchange_weight = torch.where(y > 0, (len(y) - positives) / positives, torch.ones(())) if config.balance \
        else torch.ones_like(y)
    exchange_weight = exchange_weight / exchange_weight.sum()
    single = x.shape[1] == 1
    for _ in tqdm(range(config.steps), desc="train-probe", disable=not progress):
        logits = torch.einsum("etlh,lh->et", x, weight) + bias
        if single:
            loss_tokens = torch.nn.functional.binary_cross_entropy_with_logits(
                logits[:, 0], y, reduction="none")
        else:
            ema = ema_traces(logits, mask, config.alpha)
            peak = torch.where(mask, ema, torch.zeros_like(ema)).amax(1).clamp(1e-6, 1 - 1e-6)
            loss_tokens = -(y * peak.log() + (1 - y) * (1 - peak).log())
        loss = (loss_tokens * exchange_weight).sum() + config.weight_decay * weight.pow(2).sum() / 2
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        raw_weight = weight / std
        raw_bias = bias - (raw_weight * mean).sum()
    return raw_weight.detach().float(), raw_bias.detach().float().reshape(1)


def exchange_scores(acts: Activations, weight: torch.Tensor, bias: torch.Tensor, alpha: float) -> np.ndarray:
    """One score per exchange: the highest EMA over its tokens (final mode: its probability)."""
    with torch.no_grad():
        logits = probe_logits(acts.features, weight, bias)
        traces = ema_traces(logits, acts.mask, alpha)
        traces = torch.where(acts.mask, traces, torch.zeros_like(traces))
        return traces.max(1).values.numpy()


def auroc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve (ties count half), by ranks."""
    scores, positives = np.asarray(scores, dtype=np.float64), np.asarray(positives, dtype=bool)
    n_pos, n_neg = positives.sum(), (~positives).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    ranks = np.empty(len(scores))
    sorted_scores = scores[order]
    i = 0
    while i < len(scores):  # average ranks over ties
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return float((ranks[positives].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
