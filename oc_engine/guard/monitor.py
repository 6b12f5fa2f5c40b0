"""Guarded generation for one sequence: its `SequenceGuard`, its classifier calls, its events.

`SequenceMonitor` is what the engine calls after each of its sequence's tokens. It feeds the
probe flags to the guard (a non-finite score or EMA counts as a pause), carries out the guard's
actions (release text, submit a check, refuse, stop), polls the classifier's future without
blocking decoding, and applies the deadline by arrival time: a verdict that arrives later than
`deadline_s` after its check was submitted counts as "timeout" (fail closed) whatever it says,
and so does a malformed answer ("error"). What the user may see leaves only as events
(`TextReleased`, `Paused`, `VerdictReceived`, `Refused`, and with `score_events` a
`TokenScored` per token), taken with `take_events`. With `record_trace` it keeps a per-token
trace; `trace_rows` leaves out the ids of tokens never shown unless asked. Nothing here knows about other sequences: a verdict, a wait at `max_held`
or a block touches only this one.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Protocol

from oc_engine.config_fields import is_number
from oc_engine.engine.sequence import Sequence
from oc_engine.guard.pooled_states import AnswerStates
from oc_engine.guard.policy import VERDICTS, Check, GuardConfig, Refuse, Release, SequenceGuard, token_flags
from oc_engine.outputs import GuardReport, Paused, Refused, TextReleased, TokenScored, Verdict, VerdictReceived


# On a CPU shared with decoding, a check runs in the time decoding leaves; under a full batch
# that may be none, and a starved check would miss its deadline and fail closed. A check older
# than this share of its deadline makes decoding yield until a verdict arrives.
OVERDUE_SHARE = 0.25


class Classifier(Protocol):
    """An optional `drain()` is called by the decode loop between steps and before it waits
    for a verdict: an inline classifier runs its queued checks then (see `check_batcher`).
    One with `reads_states = True` (a `StateReader`) is also passed `states=` (the sequence's
    `AnswerStates`) and `covers=` (the answer tokens the check covers) by keyword."""

    def submit(self, prompt: str, response: str, urgent: bool = False, judged_chars: int = 0) -> cf.Future:
        """A future of a dict with at least 'verdict' (allow, block, uncertain) and 'p_unsafe'.

        urgent: the sequence's decoding waits for this verdict.
        judged_chars: the first characters of `response` that an earlier allowed check of this
        answer already judged (a classifier that reads a long answer in windows may start its
        windows there; one that reads it whole may ignore it)."""


@dataclass
class PendingCheck:
    check: Check
    future: cf.Future
    submitted: float
    arrived: float | None = None  # when the future finished (set from the classifier's thread)


class SequenceMonitor:
    """seq: the request it guards, which owns the answer's tokens and text (the engine appends
    each token there before calling `on_token`).
    prompt: the request the answer answers (a conversation's last user turn), which the
    answer checks judge the answer against; conversation: what the input check judges (every
    turn, the system prompt included; default: `prompt`).
    score_events: a `TokenScored` event per token (a live trace, `serve`'s console)."""

    def __init__(self, seq: Sequence, prompt: str, config: GuardConfig, classifier: Classifier | None,
                 *, record_trace: bool = False, clock: Callable[[], float] = time.perf_counter,
                 conversation: str | None = None, score_events: bool = False):
        self.seq, self.prompt, self.config, self.classifier = seq, prompt, config, classifier
        self.conversation = prompt if conversation is None else conversation
        self.judged = 0  # the answer's first tokens that an allowed check judged
        self.request_id, self.record_trace, self.clock = seq.request_id, record_trace, clock
        self.score_events = score_events
        self.policy = SequenceGuard(config)
        self.released_chars = 0  # how much of the answer's text was released
        self.refusal: str | None = None
        self.pending: PendingCheck | None = None
        self.verdicts: list[Verdict] = []
        self.trace: list[dict] = []
        self._events: list = []
        self._traced_events = 0  # guard events already written to the trace
        self._pauses_seen = 0
        # A state reader judges the model's own tapped states: each token's row is kept here.
        self.states = AnswerStates() if getattr(classifier, "reads_states", False) else None

    # -- the engine's hooks -------------------------------------------------------------
    def start(self) -> None:
        """The request is being prefilled: the input check, if configured, is submitted now."""
        self._apply(self.policy.start())

    @property
    def text(self) -> str:
        """The released text."""
        return self.seq.stream.text[:self.released_chars]

    def on_token(self, token: int, score: float | None, ema: float | None, flags: int, state=None) -> None:
        """`token`, the sequence's last (already appended), was scored `score`, `ema`, `flags`;
        state: the tapped hidden states [L, H] that produced it (kept only for a state reader)."""
        if self.states is not None:
            self.states.add(state)
        flags = token_flags(flags, score, ema)
        if self.score_events:  # before the pause it may cause
            self._events.append(TokenScored(self.request_id, len(self.seq.token_ids) - 1, _finite_or_none(score),
                                            _finite_or_none(ema)))
        self._apply(self.policy.on_token(flags))
        if self.record_trace:
            # This token's events, and those since the previous token (verdicts arrive between tokens).
            self.trace.append({"token": token, "index": len(self.seq.token_ids) - 1, "score": _finite_or_none(score),
                               "ema": _finite_or_none(ema), "flags": flags, "state": self.policy.state,
                               "events": self._new_trace_events()})

    def on_finish(self) -> None:
        self._apply(self.policy.on_finish())

    @property
    def wants_tokens(self) -> bool:
        return self.policy.wants_tokens

    @property
    def must_wait(self) -> bool:
        return self.policy.must_wait

    def overdue(self) -> bool:
        """A check has waited longer than `OVERDUE_SHARE` of its deadline: the engine should stop
        decoding for a moment and leave the classifier the machine (see `LLMEngine.step`)."""
        pending = self.pending
        return pending is not None and not pending.future.done() \
            and self.clock() - pending.submitted > OVERDUE_SHARE * self.config.deadline_s

    def poll(self) -> None:
        """Deliver a finished verdict or an expired deadline; never blocks. A verdict is judged by
        when it arrived, not when it is read: one later than the deadline is a timeout."""
        pending = self.pending
        if pending is None:
            return
        now = self.clock()
        arrived = pending.arrived if pending.future.done() else None
        if arrived is None and pending.future.done():
            arrived = now  # done but its callback has not run yet: it arrives now
        late_by = (arrived if arrived is not None else now) - pending.submitted
        if late_by > self.config.deadline_s:
            self.pending = None
            pending.future.cancel()
            self._verdict(pending.check, "timeout", {"latency_ms": round(late_by * 1000, 3)})
        elif arrived is not None:
            self.pending = None
            self._deliver(pending.check, pending.future, late_by)

    def finish(self) -> None:
        """The sequence is over and no verdict is pending: release the text the stream still held
        back (a possible stop-string prefix) if the answer completed."""
        shown = self.policy.shown
        if self.policy.status == "completed" and shown == len(self.seq.token_ids):
            self._release_to(self.seq.stream.released_chars)  # the tail a stop-string prefix held back
        if self.record_trace and self.trace:
            self.trace[-1]["events"] += self._new_trace_events()  # the verdicts after the last token

    def cancel(self) -> None:
        """The request was cancelled: drop the check in flight; nothing more is released."""
        if self.pending is not None:
            self.pending.future.cancel()
            self.pending = None

    def take_events(self) -> list:
        events, self._events = self._events, []
        return events

    # -- results ------------------------------------------------------------------------
    def report(self) -> GuardReport:
        return GuardReport(status=self.policy.status, reason=self.policy.reason,
                           pause_points=tuple(self.policy.pause_points), verdicts=tuple(self.verdicts),
                           released_tokens=self.policy.shown)

    def trace_rows(self, include_held: bool = False) -> list[dict]:
        """The per-token trace. Tokens never shown (held, then blocked or stopped) appear with
        `token` null and `withheld` true unless `include_held`: a trace file must not leak the
        text the guard kept back."""
        rows = []
        for row in self.trace:
            row = dict(row)
            if not include_held and row["index"] >= self.policy.shown:
                row.update(token=None, withheld=True)
            rows.append(row)
        return rows

    # -- internals ----------------------------------------------------------------------
    def _apply(self, actions: list) -> None:
        for action in actions:
            if isinstance(action, Release):
                if action.stop > 0:
                    self._release_to(self.seq.text_ends[action.stop - 1])
            elif isinstance(action, Check):
                if self.classifier is None:
                    self._apply(self.policy.on_no_classifier())
                    continue
                self._submit(action)
            elif isinstance(action, Refuse):
                self.refusal = action.text
                self._events.append(Refused(self.request_id, action.text))
        while self._pauses_seen < len(self.policy.pause_points):
            self._events.append(Paused(self.request_id, self.policy.pause_points[self._pauses_seen]))
            self._pauses_seen += 1

    def _submit(self, check: Check) -> None:
        if check.input:
            prompt, response, judged_chars = self.conversation, "", 0
        else:
            prompt = self.prompt
            # The stream's text, decoded once as the tokens came: no re-decoding per check.
            stream = self.seq.stream
            response = stream.text_upto(check.covers)
            judged_chars = stream.token_ends[self.judged - 1] if self.judged else 0
        submitted = self.clock()
        try:
            # urgent: this sequence's decoding waits for the verdict (held at max_held, or ended).
            urgent = self.policy.must_wait or self.policy.finished
            if self.states is not None:  # a state reader: the states of the tokens the check covers
                future = self.classifier.submit(prompt, response, urgent=urgent, judged_chars=judged_chars,
                                                states=self.states, covers=check.covers)
            else:
                future = self.classifier.submit(prompt, response, urgent=urgent, judged_chars=judged_chars)
            if not isinstance(future, cf.Future):
                raise TypeError(f"submit returned {type(future).__name__}, not a future")
        except Exception as exc:  # noqa: BLE001 - any failure to submit fails closed
            future = cf.Future()
            future.set_exception(exc)
        pending = self.pending = PendingCheck(check, future, submitted)
        future.add_done_callback(lambda _f, p=pending: setattr(p, "arrived", self.clock()))

    def _deliver(self, check: Check, future: cf.Future, latency: float) -> None:
        detail = {"latency_ms": round(latency * 1000, 3)}
        try:
            verdict, extra = _parse_verdict(future.result())
            detail.update(extra)
        except Exception as exc:  # noqa: BLE001 - a classifier failure is a verdict: error
            verdict, detail["error"] = "error", f"{type(exc).__name__}: {exc}"
        self._verdict(check, verdict, detail)

    def _verdict(self, check: Check, verdict: str, detail: dict) -> None:
        record = Verdict(verdict=verdict, covers=check.covers, final=check.final, p_unsafe=detail.get("p_unsafe"),
                         latency_ms=detail.get("latency_ms"), error=detail.get("error"), input=check.input)
        self.verdicts.append(record)
        if verdict == "allow" and not check.input:
            self.judged = max(self.judged, check.covers)
        self._events.append(VerdictReceived(self.request_id, record))
        self._apply(self.policy.on_verdict(check, verdict, detail))

    def _new_trace_events(self) -> list[dict]:
        events, self._traced_events = self.policy.events[self._traced_events:], len(self.policy.events)
        return events

    def _release_to(self, end: int) -> None:
        """Release the answer's text up to `end` characters (the text of the tokens released:
        what a stop string or a split character held back comes with a later token)."""
        if end > self.released_chars:
            piece, self.released_chars = self.seq.stream.text[self.released_chars:end], end
            self._events.append(TextReleased(self.request_id, piece))


def wait_for_verdicts(monitors: Iterable[SequenceMonitor], wake: cf.Future | None = None) -> None:
    """Block until one pending verdict arrives, the nearest deadline passes, or `wake` is done
    (a caller with new work: a request to add or cancel)."""
    pending = [(m.pending, m.config.deadline_s, m.clock) for m in monitors if m.pending is not None]
    if pending:
        timeout = max(0.0, min(p.submitted + deadline - clock() for p, deadline, clock in pending))
        futures = [p.future for p, _, _ in pending] + ([wake] if wake is not None else [])
        cf.wait(futures, timeout=timeout + 1e-3, return_when=cf.FIRST_COMPLETED)


def _finite_or_none(value: float | None) -> float | None:
    """A trace is JSON: NaN and inf (a non-finite score, which paused) are written as null."""
    return value if value is None or math.isfinite(value) else None


def _parse_verdict(result) -> tuple[str, dict]:
    """(verdict, the answer's other fields) from a classifier's answer; raises on a malformed one:
    not a dict, an unknown verdict, or a p_unsafe that is not a number in [0, 1]."""
    if not isinstance(result, dict):
        raise TypeError(f"the classifier answered {type(result).__name__}, not a dict")
    verdict = result.get("verdict")
    if not isinstance(verdict, str) or verdict not in VERDICTS:
        raise ValueError(f"the classifier answered an unknown verdict {verdict!r}")
    p_unsafe = result.get("p_unsafe")
    if p_unsafe is not None and (not is_number(p_unsafe) or not math.isfinite(p_unsafe)
                                 or not 0 <= p_unsafe <= 1):
        raise ValueError(f"the classifier answered p_unsafe {p_unsafe!r}")
    return verdict, {k: v for k, v in result.items() if k != "verdict"}
