"""Device-side probe state for the engine's slots, used inside the compiled step."""

from __future__ import annotations

import torch

import oc_engine.kernels.probe_ema  # noqa: F401  (registers torch.ops.oc_engine.probe_ema)
from oc_engine.engine.accel import mark_static, probe_ema_op
from oc_engine.guard.probe import Probe


class ProbeRuntime:
    """Weight, bias, per-row EMA and thresholds on the device; rows that wait keep their EMA.

    Thresholds are a tensor (alpha, warn, pause), so new values never recompile the step.
    One set per runner (one batch shape), written only in place and marked static: the step
    updates the EMA in place, and a mutated input that is not static would make inductor skip
    CUDA graphs for the whole step.
    """

    def __init__(self, probe: Probe, batch: int, device: torch.device):
        cfg = probe.config
        self.weight = mark_static(probe.weight.to(device, copy=True))  # [L, H] fp32; `load` writes into it
        self.bias = mark_static(probe.bias.to(device, copy=True))  # [1]
        self.thresholds = mark_static(torch.tensor([cfg.alpha, cfg.warn, cfg.pause], device=device))
        self.ema = mark_static(torch.full((batch,), -1.0, device=device))  # -1: no score yet
        self.active = mark_static(torch.ones(batch, dtype=torch.bool, device=device))  # False: frozen this step
        self._probe_ema = probe_ema_op(torch.device(device))

    def load(self, probe: Probe) -> None:
        """Another probe of the same shape: copied in place, so the compiled step is reused."""
        cfg = probe.config
        self.weight.copy_(probe.weight)
        self.bias.copy_(probe.bias)
        self.thresholds.copy_(torch.tensor([cfg.alpha, cfg.warn, cfg.pause]))

    def reset(self, row: int) -> None:
        """A new sequence takes this row: no score yet."""
        self.ema[row] = -1.0

    def score(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [L, B, H] -> (score [B], ema [B], flags [B] int32), updating the EMA of active
        rows. B may be fewer than the runtime's rows (a batch bucket): its first B rows."""
        rows = hidden.shape[1]
        ema, active = self.ema[:rows], self.active[:rows]  # views: the EMA is updated in place
        before = ema.clone()
        score, flags = self._probe_ema(hidden, self.weight, self.bias, ema, self.thresholds)
        ema.copy_(torch.where(active, ema, before))
        return score, ema.clone(), flags

    def score_row(self, hidden: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Prefill: hidden [L, 1, H] for one row."""
        ema = self.ema[row:row + 1]
        score, flags = torch.ops.oc_engine.probe_ema(hidden, self.weight, self.bias, ema, self.thresholds)
        return score, ema.clone(), flags
