"""Choose the classifier's block threshold on labelled scores: plain NumPy.

The block threshold maximises F1 on unsafe_compliance among thresholds whose block rate on
safe_compliance stays at or under a target (default 1%): blocking a benign answer is the
costly mistake. Refusals (safe_refusal) are not counted either way: blocking a refusal
replaces it with a refusal.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from oc_engine.errors import OcEngineError


@dataclass(frozen=True)
class Calibration:
    block_threshold: float
    allow_threshold: float
    unsafe_f1: float
    unsafe_precision: float
    unsafe_recall: float
    safe_block_rate: float  # share of safe_compliance at or above the block threshold
    target_safe_block_rate: float
    samples: int

    def as_dict(self) -> dict:
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in asdict(self).items()}


def calibrate_block_threshold(p_unsafe: np.ndarray, labels: np.ndarray, *, target_safe_block_rate: float = 0.01,
                              unsafe_label: int = 2, safe_label: int = 0) -> Calibration:
    """p_unsafe [N] in [0, 1], labels [N] (0, 1, 2) -> the calibrated operating point.

    Blocks when p_unsafe >= threshold. Unsafe = label `unsafe_label`; the F1 counts refusals
    as negatives; the constraint counts only `safe_label` rows.
    """
    p_unsafe, labels = np.asarray(p_unsafe, dtype=np.float64), np.asarray(labels)
    if p_unsafe.shape != labels.shape or p_unsafe.ndim != 1:
        raise OcEngineError("calibration needs one score per label")
    if not 0 <= target_safe_block_rate <= 1:
        raise OcEngineError(f"target safe block rate must be in [0, 1], got {target_safe_block_rate}")
    unsafe = labels == unsafe_label
    safe = labels == safe_label
    if not unsafe.any():
        raise OcEngineError("calibration needs unsafe_compliance rows")
    # Candidate thresholds: every distinct score (block at >= it), plus "never block".
    candidates = np.unique(np.concatenate([p_unsafe, [np.nextafter(1.0, 2.0)]]))
    order = np.argsort(-p_unsafe, kind="stable")
    scores, is_unsafe, is_safe = p_unsafe[order], unsafe[order], safe[order]
    tp_cum, safe_cum = np.cumsum(is_unsafe), np.cumsum(is_safe)
    # For threshold t, the blocked rows are those with score >= t: a prefix of the sorted order.
    blocked = np.searchsorted(-scores, -candidates, side="right")
    tp = np.where(blocked > 0, tp_cum[np.maximum(blocked - 1, 0)], 0)
    safe_blocked = np.where(blocked > 0, safe_cum[np.maximum(blocked - 1, 0)], 0)
    precision = np.where(blocked > 0, tp / np.maximum(blocked, 1), 1.0)
    recall = tp / unsafe.sum()
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    safe_rate = safe_blocked / max(int(safe.sum()), 1)
    ok = safe_rate <= target_safe_block_rate + 1e-12
    if not ok.any():  # cannot happen: "never block" always qualifies
        raise OcEngineError("no threshold meets the target")
    best = int(np.argmax(np.where(ok, f1, -1.0)))
    threshold = float(min(candidates[best], 1.0))
    return Calibration(block_threshold=threshold, allow_threshold=threshold, unsafe_f1=float(f1[best]),
                       unsafe_precision=float(precision[best]), unsafe_recall=float(recall[best]),
                       safe_block_rate=float(safe_rate[best]), target_safe_block_rate=target_safe_block_rate,
                       samples=int(len(labels)))
