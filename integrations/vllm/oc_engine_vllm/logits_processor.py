"""The per-request EMA, the score table and the hard stop: a vLLM V1 logits processor.

A request takes part when its `SamplingParams.extra_args["oc_engine"]` is set (the backend
does it for every guarded request):

    {"table": "/dev/shm/oc-engine-scores-....bin", "row": 3, "tag": 17,
     "alpha": 0.3, "warn": 0.5, "pause": 0.8, "eos": 2}

On each step, for each such row of the batch, the token about to be sampled has index
k = len(output_token_ids); its score comes from `step_scores` (put there by the model's
`compute_logits` a moment earlier), its EMA is oc-engine's (`ema_update`: the same maths as the
native kernel) from entry k-1 of the table, and both are written to entry k. A re-run of the
same k (a chunked prefill's partial step, whose token vLLM discards) rewrites the same entry.
If the caller set the row's stop flag, every logit but EOS is -inf: the answer ends now.

`is_argmax_invariant()` is False: vLLM skips invariant processors for greedy requests, and
greedy requests must be scored too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor, MoveDirectionality

from oc_engine.config_fields import is_int, is_number
from oc_engine.kernels.probe_ema import ema_update
from oc_engine_vllm import step_scores
from oc_engine_vllm.score_table import ScoreTable

EXTRA_ARGS_KEY = "oc_engine"
FIELDS = {"table": str, "row": int, "tag": int, "alpha": float, "warn": float, "pause": float, "eos": int}


@dataclass
class Tracked:
    table: ScoreTable
    row: int
    tag: int
    alpha: float
    warn: float
    pause: float
    eos: int
    output_ids: list[int]  # vLLM's live list of this request's output tokens


def request_spec(params) -> dict | None:
    """The request's oc-engine settings, or None; raises ValueError on a malformed one."""
    spec = (params.extra_args or {}).get(EXTRA_ARGS_KEY)
    if spec is None:
        return None
    if not isinstance(spec, dict) or set(spec) != set(FIELDS):
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}] must have exactly the keys {sorted(FIELDS)}")
    for key, kind in FIELDS.items():
        value = spec[key]
        if not (is_number(value) if kind is float else is_int(value) if kind is int else isinstance(value, kind)):
            raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}][{key!r}] must be {kind.__name__}, got {value!r}")
    if not 0 < spec["alpha"] <= 1 or not 0 <= spec["warn"] <= spec["pause"] <= 1:
        raise ValueError(f"extra_args[{EXTRA_ARGS_KEY!r}]: need 0 < alpha <= 1 and 0 <= warn <= pause <= 1")
    return spec


class ProbeEmaLogitsProcessor(LogitsProcessor):
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        request_spec(sampling_params)

    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, Tracked] = {}  # persistent batch index -> request
        self._tables: dict[str, ScoreTable] = {}
        # Under tensor parallelism every rank samples, but the scheduler keeps the first rank's
        # tokens: that rank alone writes the table (the others may be on another host).
        self.writes = _first_tensor_parallel_rank()

    def is_argmax_invariant(self) -> bool:
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None or not self.writes:
            return
        for index in batch_update.removed:
            self.rows.pop(index, None)
        for index, params, _prompt_ids, output_ids in batch_update.added:
            spec = request_spec(params)
            if spec is None:
                self.rows.pop(index, None)
                continue
            self.rows[index] = Tracked(self._table(spec["table"]), spec["row"], spec["tag"], float(spec["alpha"]),
                                       float(spec["warn"]), float(spec["pause"]), spec["eos"], output_ids)
        for a, b, direction in batch_update.moved:
            first, second = self.rows.pop(a, None), self.rows.pop(b, None)
            if first is not None:
                self.rows[b] = first
            if direction == MoveDirectionality.SWAP and second is not None:
                self.rows[a] = second

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        scores = step_scores.take()
        if not self.rows:
            return logits
        # Rows without a score (none published, or a count that does not match the logits) get
        # NaN: the EMA stays, the token is flagged non-finite, and the guard pauses.
        values = scores.tolist() if scores is not None and scores.shape[0] == logits.shape[0] else None
        order = sorted(self.rows.items())
        score = torch.tensor([values[i] if values is not None and i < len(values) else math.nan for i, _ in order],
                             dtype=torch.float32)
        previous = torch.tensor([t.table.previous_ema(t.row, t.tag, len(t.output_ids)) for _, t in order],
                                dtype=torch.float32)
        settings = torch.tensor([(t.alpha, t.warn, t.pause) for _, t in order], dtype=torch.float32)
        ema, flags = ema_update(score, previous, settings[:, 0], settings[:, 1], settings[:, 2])
        for (index, tracked), s, e, f in zip(order, score.tolist(), ema.tolist(), flags.tolist()):
            tracked.table.write(tracked.row, tracked.tag, len(tracked.output_ids), s, e, f)
            if tracked.table.stopped(tracked.row, tracked.tag) and index < logits.shape[0]:
                logits[index] = float("-inf")
                logits[index, tracked.eos] = 0.0
        return logits

    def _table(self, path: str) -> ScoreTable:
        table = self._tables.get(path)
        if table is None:
            table = self._tables[path] = ScoreTable.open(path)
        return table


def _first_tensor_parallel_rank() -> bool:
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (AssertionError, RuntimeError):  # no distributed state (a unit test): a single process
        return True
