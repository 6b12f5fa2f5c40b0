"""What a state reader reads: the served model's own hidden states, pooled over the exchange.

The engine taps the probe's layers in every step (`ModelRunner`), so an answer's states cost
nothing more to have. Row j of an answer is the tapped state [L, H] that produced answer token
j, as the probe's score for token j (`training.activations`): row 0 is the prompt's last
position, which has read the whole conversation (system prompt and history included); rows
1.. are the answer's own tokens. A check that covers the answer's first `n` tokens reads

    [ row 0 | mean of rows 1..n-1 | mean of the last `recent` of rows 1..n-1 ]   each [L * H]

(zeros for a part with no rows): the request as the model understood it, the answer so far,
and the answer's latest tokens. One definition serves training (`pool_batch`, vectorised over
exchanges) and the engine (`AnswerStates`, one sequence's rows as they arrive); a test keeps
them equal.
"""

from __future__ import annotations

import numpy as np
import torch

RECENT = 16  # answer rows in the "latest tokens" part


def pool(rows: np.ndarray, recent: int = RECENT) -> np.ndarray:
    """rows [n, L, H] (n >= 1) -> features [3 * L * H] float32 (see the module docstring)."""
    rows = np.asarray(rows, dtype=np.float32)
    answer = rows[1:].reshape(len(rows) - 1, rows[0].size)
    width = rows[0].size
    mean = answer.mean(axis=0) if len(answer) else np.zeros(width, np.float32)
    latest = answer[-recent:].mean(axis=0) if len(answer) else np.zeros(width, np.float32)
    return np.concatenate([rows[0].reshape(-1), mean, latest]).astype(np.float32)


def pool_batch(features: torch.Tensor, lengths: torch.Tensor, recent: int = RECENT) -> torch.Tensor:
    """features [E, T, L, H] (rows per exchange, padded), lengths [E] (rows covered, >= 1) ->
    [E, 3 * L * H] float32: `pool` of each exchange's first `lengths` rows."""
    count = features.shape[0]
    states = features.float().reshape(count, features.shape[1], -1)
    index = torch.arange(states.shape[1])[None, :]
    answer = ((index >= 1) & (index < lengths[:, None])).float()
    latest = answer * (index >= lengths[:, None] - recent).float()

    def mean(weights: torch.Tensor) -> torch.Tensor:
        return torch.einsum("et,etd->ed", weights, states) / weights.sum(1).clamp(min=1)[:, None]

    return torch.cat([states[:, 0], mean(answer), mean(latest)], dim=1)


class AnswerStates:
    """One sequence's tapped rows as the engine hands them over (float32, host memory), so a
    check can pool any prefix: a check covers the answer up to its pause point, which may lie
    before the newest token (tokens decoded while an earlier check ran)."""

    def __init__(self):
        self._rows: np.ndarray | None = None  # [capacity, L, H]
        self.count = 0
        self.missing = False  # a token came without its row (an engine that does not tap)

    def add(self, row) -> None:
        """row [L, H] (a tensor or an array), or None when the engine had none."""
        if row is None:
            self.missing = True
            return
        row = row.float().cpu().numpy() if isinstance(row, torch.Tensor) else np.asarray(row, np.float32)
        if self._rows is None:
            self._rows = np.empty((64, *row.shape), np.float32)
        elif self.count == len(self._rows):
            self._rows = np.concatenate([self._rows, np.empty_like(self._rows)])
        self._rows[self.count] = row
        self.count += 1

    def features(self, covers: int, recent: int = RECENT) -> np.ndarray:
        """The pooled features of the answer's first `covers` tokens (at least the prompt's row)."""
        if self.missing or self._rows is None or covers > self.count:
            raise ValueError(f"the engine passed {self.count} of the answer's hidden states, the check covers "
                             f"{covers} tokens")
        return pool(self._rows[:max(covers, 1)], recent)
