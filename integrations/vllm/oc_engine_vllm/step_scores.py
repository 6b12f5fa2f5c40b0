"""The hand-off inside one worker process, from `compute_logits` to the logits processor that
runs right after it in the same step: the probe scores of the rows about to be sampled."""

from __future__ import annotations

import torch

_scores: torch.Tensor | None = None  # [num_reqs] fp32, one per logits row


def publish(scores: torch.Tensor) -> None:
    global _scores
    _scores = scores.detach()


def take() -> torch.Tensor | None:
    """This step's scores (once: a second call in the same step gets None)."""
    global _scores
    scores, _scores = _scores, None
    return scores
