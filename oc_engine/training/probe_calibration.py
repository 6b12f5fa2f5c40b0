"""Choose the probe's pause and warn thresholds (and EMA alpha) by replaying exchanges.

For each candidate alpha, the EMA trace of every validation exchange is computed with the
kernel's maths; the pause threshold is the lowest that pauses at most `target` of the benign
exchanges (safe_compliance: the answers where a pause costs a legitimate user time), and the
alpha that then pauses the most unsafe_compliance answers wins. The chosen settings are
replayed token by token through `SequenceGuard`, the policy code generation uses, and the
report comes from that replay: detection rate, benign pause rate, pause rate per label, and
the median number of response tokens before the pause.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch

from oc_engine.data import LABELS, UNSAFE
from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import PAUSE, WARN, GuardConfig, SequenceGuard, token_flags
from oc_engine.training.activations import Activations
from oc_engine.training.probe_training import ema_traces, probe_logits

SAFE_COMPLIANCE = 0
ALPHAS = (0.1, 0.2, 0.3, 0.5, 1.0)


@dataclass(frozen=True)
class ProbeCalibration:
    alpha: float
    warn: float
    pause: float
    detection_rate: float  # unsafe_compliance exchanges that pause
    benign_pause_rate: float  # safe_compliance exchanges that pause
    target_benign_pause_rate: float
    pause_rate_by_label: dict
    median_tokens_to_detection: float | None
    exchanges: int

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def _threshold_for(benign_max: np.ndarray, target: float) -> float:
    """The lowest threshold with at most `target` of benign maxima at or above it."""
    if len(benign_max) == 0:
        raise OcEngineError("calibration needs safe_compliance exchanges (benign answers)")
    ordered = np.sort(benign_max)[::-1]
    allowed = int(np.floor(target * len(ordered) + 1e-9))
    if allowed >= len(ordered):
        return 0.0
    return float(min(np.nextafter(ordered[allowed], np.inf), 1.0))


def replay_pauses(traces: np.ndarray, mask: np.ndarray, warn: float, pause: float, every: int = 1) -> list[int | None]:
    """Feed each trace through SequenceGuard; the first pause point per exchange (None: never)."""
    firsts = []
    for trace, valid in zip(traces, mask):
        guard = SequenceGuard(GuardConfig(every=every))
        for ema in trace[valid]:
            flags = (WARN if ema >= warn else 0) | (PAUSE if ema >= pause else 0)
            guard.on_token(token_flags(flags, None, float(ema)))
            if guard.pause_points:
                break
        firsts.append(guard.pause_points[0] if guard.pause_points else None)
    return firsts


def calibrate_probe(acts: Activations, weight: torch.Tensor, bias: torch.Tensor, *, target: float = 0.02,
                    alphas=ALPHAS, warn_factor: float = 5.0) -> ProbeCalibration:
    if not 0 <= target < 1:
        raise OcEngineError(f"target benign pause rate must be in [0, 1), got {target}")
    labels = acts.labels.numpy()
    mask = acts.mask.numpy()
    with torch.no_grad():
        logits = probe_logits(acts.features, weight, bias)
    best = None
    for alpha in alphas:
        traces = ema_traces(logits, acts.mask, alpha).numpy()
        maxima = np.where(mask, traces, -1.0).max(1)
        pause = _threshold_for(maxima[labels == SAFE_COMPLIANCE], target)
        detection = float((maxima[labels == UNSAFE] >= pause).mean()) if (labels == UNSAFE).any() else 0.0
        if best is None or detection > best[0] + 1e-12:
            best = (detection, alpha, pause, traces, maxima)
    _, alpha, pause, traces, maxima = best
    warn = min(_threshold_for(maxima[labels == SAFE_COMPLIANCE], min(target * warn_factor, 0.999)), pause)
    firsts = replay_pauses(traces, mask, warn, pause)
    paused = np.array([f is not None for f in firsts])
    detected = [f + 1 for f, label in zip(firsts, labels) if f is not None and label == UNSAFE]
    by_label = {name: round(float(paused[labels == i].mean()), 4) if (labels == i).any() else None
                for i, name in enumerate(LABELS)}
    return ProbeCalibration(alpha=alpha, warn=warn, pause=pause,
                            detection_rate=float(paused[labels == UNSAFE].mean()) if (labels == UNSAFE).any() else 0.0,
                            benign_pause_rate=float(paused[labels == SAFE_COMPLIANCE].mean()),
                            target_benign_pause_rate=target, pause_rate_by_label=by_label,
                            median_tokens_to_detection=float(np.median(detected)) if detected else None,
                            exchanges=int(len(labels)))
