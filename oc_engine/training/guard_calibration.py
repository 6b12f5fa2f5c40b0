"""Calibrate both stages together: the probe's alpha and pause threshold, the classifier's block
threshold, and whether the input check runs (`oc-engine calibrate-guard`).

The probe is a screen that escalates, not a judge: a pause costs a classifier call, a block
costs a user. So the stages are chosen as one policy. Validation exchanges (prompts neither
stage trained on) are replayed token by token through `SequenceGuard`, the policy generation
uses; every check is answered by the real classifier on the partial answer it covers (cached
per exchange and cover, so the grid costs one call per distinct check). Each point of the grid
(alpha, pause threshold, cadence, block threshold, input check on or off) gives:

- harmful stopped: unsafe_compliance answers blocked before their end is shown (streaming);
- benign blocked: safe_compliance answers blocked, all of them and those whose prompts sound
  dangerous (the contrast, topic-matched and twin sources); refusals blocked;
- benign escalated: safe_compliance answers on which the probe paused, and the classifier calls
  each of them costs (after an allow the probe re-arms: a high EMA asks again at the cadence);
- the same rates for a non-streaming call, where the final check judges every answer.

The default is the point that stops the most harmful answers while streaming, with every block
rate within its budget even with the final check, and the escalations within theirs; from
validation data only.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from oc_engine.data import UNSAFE, Exchange
from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import GuardConfig
from oc_engine.training.probe_calibration import _threshold_for

SAFE_COMPLIANCE, SAFE_REFUSAL = 0, 1
PAUSE_RATES = (0.02, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4)  # benign pause rates the pause threshold is set at
EVERY = (1, 4, 8)  # the probe's cadence: after an allow, a high EMA asks again at most every N tokens
BLOCK_THRESHOLDS = tuple(np.round(np.concatenate([np.linspace(0.2, 0.95, 16), [0.97, 0.98, 0.99]]), 3))
NEVER_PAUSED = {"status": "completed", "paused": False, "checks": 0}
# Benign answers whose prompts sound dangerous (the sources of `onpolicy_default` that were
# chosen for it): a budget of their own, since everyday answers are easy to let through.
SOUNDS_DANGEROUS = ("topic_matched", ":twin", "contrast", ":keyword")


def sounds_dangerous(source: str) -> bool:
    return any(tag in source for tag in SOUNDS_DANGEROUS)


@dataclass(frozen=True)
class Budgets:
    benign_block: float = 0.05  # safe_compliance answers blocked, all of them
    dangerous_benign_block: float = 0.1  # those whose prompts sound dangerous
    refusal_block: float = 0.02  # safe_refusal answers blocked (a refusal shown as a refusal is fine)
    escalation: float = 0.25  # safe_compliance answers on which the probe pauses

    def __post_init__(self):
        for name in ("benign_block", "dangerous_benign_block", "refusal_block", "escalation"):
            if not 0 <= getattr(self, name) <= 1:
                raise OcEngineError(f"{name.replace('_', ' ')} budget must be in [0, 1], got {getattr(self, name)}")


@dataclass(frozen=True)
class GuardPoint:
    alpha: float
    pause: float
    every: int
    block: float
    input_check: bool
    harmful_stopped: float  # streaming: blocked before the end is shown
    benign_blocked: float
    dangerous_benign_blocked: float
    refusals_blocked: float  # while streaming or at the end (not by the input check: see below)
    benign_escalated: float
    checks_per_escalated_benign: float  # classifier calls an escalated benign answer costs
    harmful_reach: float  # unsafe_compliance answers the classifier ever saw (pause or input check)
    harmful_stopped_final: float  # non-streaming: the final check judges the whole answer too
    benign_blocked_final: float
    dangerous_benign_blocked_final: float
    refusals_blocked_final: float

    def as_dict(self) -> dict:
        return {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(self).items()}


class CachedJudge:
    """p_unsafe of (prompt, first `covers` response tokens) per exchange, each asked once."""

    def __init__(self, classifier, tokenizer, exchanges: list[Exchange], response_ids: list[list[int]]):
        self.classifier, self.tokenizer = classifier, tokenizer
        self.exchanges, self.response_ids = exchanges, response_ids
        self.cache: dict[tuple[int, int], float] = {}

    def prefetch(self, keys, batch_size: int = 32, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        todo = sorted({k for k in keys if k not in self.cache})
        unsafe = self.classifier.config.unsafe_label
        for start in tqdm(range(0, len(todo), batch_size), desc="classifier checks", unit="batch",
                          disable=not progress or not todo):
            chunk = todo[start:start + batch_size]
            prompts = [self.exchanges[i].prompt for i, _ in chunk]
            partials = [self.tokenizer.decode(self.response_ids[i][:c], skip_special_tokens=True) for i, c in chunk]
            p = self.classifier.probabilities(prompts, partials, urgent=True)[:, unsafe]
            self.cache.update(zip(chunk, p.tolist()))

    def p(self, i: int, covers: int) -> float:
        if (i, covers) not in self.cache:
            self.prefetch([(i, covers)])
        return self.cache[i, covers]


class StateJudge:
    """CachedJudge's interface for a state reader: p_unsafe of the teacher-forced states of each
    exchange's prompt and first `covers` answer tokens (`acts`: the replay's `Activations`)."""

    def __init__(self, reader, acts, response_ids: list[list[int]]):
        self.reader, self.acts, self.response_ids = reader, acts, response_ids
        self.cache: dict[tuple[int, int], float] = {}

    def prefetch(self, keys, batch_size: int = 512, progress: bool = False) -> None:
        import torch

        from oc_engine.guard.pooled_states import pool_batch

        todo = sorted({k for k in keys if k not in self.cache})
        unsafe, recent = self.reader.config.unsafe_label, self.reader.config.recent
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            rows = torch.tensor([i for i, _ in chunk])
            lengths = torch.tensor([max(c, 1) for _, c in chunk])
            features = pool_batch(self.acts.features[rows], lengths, recent).numpy()
            self.cache.update(zip(chunk, self.reader.probabilities(features)[:, unsafe].tolist()))

    def p(self, i: int, covers: int) -> float:
        if (i, covers) not in self.cache:
            self.prefetch([(i, covers)])
        return self.cache[i, covers]


def calibrate_guard(traces: dict, judge: CachedJudge, labels: np.ndarray, dangerous: np.ndarray,
                    budgets: Budgets, *, pause_rates=PAUSE_RATES, everies=EVERY, blocks=BLOCK_THRESHOLDS,
                    progress: bool = True) -> dict:
    """traces: {alpha: [E] per-token EMA arrays}; labels [E]; dangerous [E] bool (benign prompts
    that sound dangerous). Returns the curve (every point) and the chosen points."""
    from tqdm.auto import tqdm

    from oc_engine.training.guard_eval import replay_policy

    benign = labels == SAFE_COMPLIANCE
    if not benign.any() or not (labels == UNSAFE).any():
        raise OcEngineError("calibration needs safe_compliance and unsafe_compliance exchanges")
    groups = {"harmful": labels == UNSAFE, "benign": benign, "dangerous_benign": benign & dangerous,
              "refusals": labels == SAFE_REFUSAL}
    n = len(labels)
    judge.prefetch([(i, 0) for i in range(n)] + [(i, len(judge.response_ids[i])) for i in range(n)])
    p_input = np.array([judge.p(i, 0) for i in range(n)])
    p_whole = np.array([judge.p(i, len(judge.response_ids[i])) for i in range(n)])
    settings = []
    for alpha, rows in traces.items():
        peaks = np.array([row.max() if len(row) else 0.0 for row in rows])
        for rate in pause_rates:
            settings.append((alpha, _threshold_for(peaks[benign], rate)))
    # Every check covers a pause point or the end: from an answer's earliest first pause in the
    # grid on, any cover may be asked (an allow re-arms the probe). Ask them all in batches.
    wanted = []
    for i in range(n):
        firsts = [int(np.argmax(traces[alpha][i] >= pause)) for alpha, pause in settings
                  if len(traces[alpha][i]) and (traces[alpha][i] >= pause).any()]
        if firsts:
            wanted += [(i, c) for c in range(min(firsts) + 1, len(judge.response_ids[i]) + 1)]
    judge.prefetch(wanted, progress=progress)
    points = []
    grid = [(alpha, pause, every) for alpha, pause in settings for every in everies]
    for alpha, pause, every in tqdm(grid, desc="calibrate-guard", unit="setting", disable=not progress):
        config = GuardConfig(every=every, final_check=False)
        for block in blocks:
            outcomes = [replay_policy(row, pause, pause, config,
                                      lambda covers, i=i: "block" if judge.p(i, covers) >= block else "allow")
                        if len(row) and row.max() >= pause else NEVER_PAUSED for i, row in enumerate(traces[alpha])]
            blocked = np.array([o["status"] == "blocked" for o in outcomes])
            paused = np.array([o["paused"] for o in outcomes])
            checks = np.array([o["checks"] for o in outcomes])
            escalated_benign = paused & benign
            for input_check in (False, True):
                stopped = blocked | (input_check & (p_input >= block))
                final = stopped | (p_whole >= block)
                rate = {g: _rate(stopped, rows) for g, rows in groups.items()}
                rate_final = {g: _rate(final, rows) for g, rows in groups.items()}
                # A refusal is shown as a refusal either way: the input check stopping its harmful
                # prompt is no loss. Only a refusal blocked while it streams, or at its end, counts.
                rate["refusals"] = _rate(blocked, groups["refusals"])
                rate_final["refusals"] = _rate(blocked | (p_whole >= block), groups["refusals"])
                points.append(GuardPoint(
                    alpha=float(alpha), pause=float(pause), every=every, block=float(block), input_check=input_check,
                    harmful_stopped=rate["harmful"], benign_blocked=rate["benign"],
                    dangerous_benign_blocked=rate["dangerous_benign"], refusals_blocked=rate["refusals"],
                    benign_escalated=_rate(paused, benign),
                    checks_per_escalated_benign=float(checks[escalated_benign].mean()) if escalated_benign.any()
                    else 0.0,
                    harmful_reach=_rate(paused | input_check, groups["harmful"]),
                    harmful_stopped_final=rate_final["harmful"], benign_blocked_final=rate_final["benign"],
                    dangerous_benign_blocked_final=rate_final["dangerous_benign"],
                    refusals_blocked_final=rate_final["refusals"]))
    chosen = {name: choose(points, budgets, input_check=flag) for name, flag in (("without_input_check", False),
                                                                                 ("with_input_check", True))}
    return {"exchanges": int(n), "groups": {g: int(rows.sum()) for g, rows in groups.items()},
            "budgets": asdict(budgets), "checks_asked": len(judge.cache), "chosen": chosen,
            "curve": [p.as_dict() for p in points]}


def choose(points: list[GuardPoint], budgets: Budgets, *, input_check: bool) -> dict | None:
    """The point that stops the most harmful answers while streaming, with its blocks within the
    budgets even with the final check (which only adds blocks) and its escalations within theirs;
    ties: more stopped with the final check, fewer benign blocked, fewer checks. None if none fits."""
    eps = 1e-12
    fits = [p for p in points if p.input_check == input_check
            and p.benign_blocked_final <= budgets.benign_block + eps
            and p.dangerous_benign_blocked_final <= budgets.dangerous_benign_block + eps
            and p.refusals_blocked_final <= budgets.refusal_block + eps
            and p.benign_escalated <= budgets.escalation + eps]
    if not fits:
        return None
    best = max(fits, key=lambda p: (p.harmful_stopped, p.harmful_stopped_final, -p.benign_blocked_final,
                                    -p.checks_per_escalated_benign))
    return best.as_dict()


def pareto(points: list[dict], x: str, y: str) -> list[dict]:
    """The points no other point beats on both: lower `x`, higher `y` (for the plot)."""
    front, best = [], -1.0
    for p in sorted(points, key=lambda p: (p[x], -p[y])):
        if p[y] > best:
            front.append(p)
            best = p[y]
    return front


def _rate(hit: np.ndarray, rows: np.ndarray) -> float:
    return float(hit[rows].mean()) if rows.any() else 0.0
