"""Guarded generation: the engine's loop, a `SequenceGuard` per sequence, and the classifier.

`GuardMonitor` is what `Engine.generate(monitor=...)` calls after every token. It feeds the
probe flags to each sequence's guard (a non-finite score or EMA counts as a pause), carries out
the guard's actions (release text, submit a check, refuse, stop), polls the classifier's
futures without blocking decoding, and applies the deadline by arrival time: a verdict that
arrives later than `deadline_s` after its check was submitted counts as "timeout" (fail
closed) whatever it says, and so does a malformed answer ("error"). With `record_trace` it
keeps a per-token trace; `trace_rows` leaves out the ids of tokens never shown unless asked.
Only released text reaches `on_text`.
"""

from __future__ import annotations

import concurrent.futures as cf
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

from oc_engine.engine.guard import VERDICTS, Check, GuardConfig, Refuse, Release, SequenceGuard, token_flags
from oc_engine.engine.text_stream import TextStream


class Classifier(Protocol):
    def submit(self, prompt: str, response: str, urgent: bool = False) -> cf.Future:
        """A future of a dict with at least 'verdict' (allow, block, uncertain) and 'p_unsafe'.

        urgent: the sequence's decoding waits for this verdict."""


@dataclass
class PendingCheck:
    check: Check
    future: cf.Future
    submitted: float
    arrived: float | None = None  # when the future finished (set from the classifier's thread)


@dataclass
class GuardedSequence:
    prompt: str
    guard: SequenceGuard
    stream: TextStream
    tokens: list[int] = field(default_factory=list)
    text: str = ""  # released text (and the refusal, if blocked)
    pending: PendingCheck | None = None
    verdicts: list[dict] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    traced_events: int = 0  # guard events already written to the trace


class GuardMonitor:
    def __init__(self, tokenizer, prompts: list[str], config: GuardConfig, classifier: Classifier | None,
                 *, stop_strings: tuple[str, ...] = (), on_text: Callable[[int, str], None] | None = None,
                 record_trace: bool = False, clock: Callable[[], float] = time.perf_counter):
        self.tokenizer, self.config, self.classifier = tokenizer, config, classifier
        self.record_trace = record_trace
        self.on_text, self.clock = on_text, clock
        self.sequences = [GuardedSequence(p, SequenceGuard(config), TextStream(tokenizer, stop_strings))
                          for p in prompts]

    # -- the engine's hooks -------------------------------------------------------------
    def on_token(self, index: int, token: int, score: float | None, ema: float | None, flags: int) -> None:
        seq = self.sequences[index]
        seq.tokens.append(token)
        flags = token_flags(flags, score, ema)
        self._apply(index, seq.guard.on_token(flags))
        if self.record_trace:
            # This token's events, and those since the previous token (verdicts arrive between tokens).
            seq.trace.append({"token": token, "index": len(seq.tokens) - 1, "score": _finite_or_none(score),
                              "ema": _finite_or_none(ema),
                              "flags": flags, "state": seq.guard.state, "events": self._new_events(seq)})

    def on_finish(self, index: int) -> None:
        self._apply(index, self.sequences[index].guard.on_finish())

    def wants_tokens(self, index: int) -> bool:
        return self.sequences[index].guard.wants_tokens

    def waiting(self, index: int) -> bool:
        return self.sequences[index].guard.must_wait

    def poll(self) -> None:
        """Deliver finished verdicts and expired deadlines; never blocks. A verdict is judged by
        when it arrived, not when it is read: one later than the deadline is a timeout."""
        now = self.clock()
        for index, seq in enumerate(self.sequences):
            pending = seq.pending
            if pending is None:
                continue
            arrived = pending.arrived if pending.future.done() else None
            if arrived is None and pending.future.done():
                arrived = now  # done but its callback has not run yet: it arrives now
            late_by = (arrived if arrived is not None else now) - pending.submitted
            if late_by > self.config.deadline_s:
                seq.pending = None
                pending.future.cancel()
                self._verdict(index, pending.check, "timeout", {"latency_ms": round(late_by * 1000, 3)})
            elif arrived is not None:
                seq.pending = None
                self._deliver(index, pending.check, pending.future, late_by)

    def wait(self) -> None:
        """Block until some pending verdict arrives or its deadline passes, then poll."""
        pending = [s.pending for s in self.sequences if s.pending is not None]
        if pending:
            now = self.clock()
            timeout = max(0.0, min(p.submitted + self.config.deadline_s - now for p in pending))
            cf.wait([p.future for p in pending], timeout=timeout + 1e-3, return_when=cf.FIRST_COMPLETED)
        self.poll()

    def drain(self) -> None:
        """After decoding: wait for the last verdicts (final checks), then flush completed text."""
        while any(s.pending is not None for s in self.sequences):
            self.wait()
        for index, seq in enumerate(self.sequences):
            if seq.guard.status == "completed":
                self._emit(index, seq.stream.finish())
            if self.record_trace and seq.trace:
                seq.trace[-1]["events"] += self._new_events(seq)  # the verdicts after the last token

    # -- results ------------------------------------------------------------------------
    def summary(self, index: int) -> dict:
        seq = self.sequences[index]
        return {"status": seq.guard.status, "reason": seq.guard.reason, "released_text": seq.text,
                "released_tokens": seq.guard.released, "pause_points": list(seq.guard.pause_points),
                "verdicts": seq.verdicts}

    def trace_rows(self, include_held: bool = False) -> list[dict]:
        """Every sequence's per-token trace. Tokens never shown (held, then blocked or stopped)
        appear with `token` null and `withheld` true unless `include_held`: a trace file must not
        leak the text the guard kept back."""
        rows = []
        for i, seq in enumerate(self.sequences):
            for row in seq.trace:
                row = {"sequence": i, **row}
                if not include_held and row["index"] >= seq.guard.released:
                    row.update(token=None, withheld=True)
                rows.append(row)
        return rows

    # -- internals ----------------------------------------------------------------------
    def _apply(self, index: int, actions: list) -> None:
        seq = self.sequences[index]
        for action in actions:
            if isinstance(action, Release):
                self._emit(index, "".join(seq.stream.push(t) for t in seq.tokens[action.start:action.stop]))
            elif isinstance(action, Check):
                if self.classifier is None:
                    self._apply(index, seq.guard.on_no_classifier())
                    continue
                response = self.tokenizer.decode(seq.tokens[:action.covers], skip_special_tokens=True)
                submitted = self.clock()
                try:
                    future = self.classifier.submit(seq.prompt, response, urgent=seq.guard.must_wait)
                    if not isinstance(future, cf.Future):
                        raise TypeError(f"submit returned {type(future).__name__}, not a future")
                except Exception as exc:  # noqa: BLE001 - any failure to submit fails closed
                    future = cf.Future()
                    future.set_exception(exc)
                pending = seq.pending = PendingCheck(action, future, submitted)
                future.add_done_callback(lambda _f, p=pending: setattr(p, "arrived", self.clock()))
            elif isinstance(action, Refuse):
                self._emit(index, action.text)

    def _deliver(self, index: int, check: Check, future: cf.Future, latency: float) -> None:
        detail = {"latency_ms": round(latency * 1000, 3)}
        try:
            verdict, extra = _parse_verdict(future.result())
            detail.update(extra)
        except Exception as exc:  # noqa: BLE001 - a classifier failure is a verdict: error
            verdict, detail["error"] = "error", f"{type(exc).__name__}: {exc}"
        self._verdict(index, check, verdict, detail)

    def _verdict(self, index: int, check: Check, verdict: str, detail: dict) -> None:
        seq = self.sequences[index]
        seq.verdicts.append({"verdict": verdict, "covers": check.covers, "final": check.final, **detail})
        self._apply(index, seq.guard.on_verdict(check, verdict, detail))

    @staticmethod
    def _new_events(seq: GuardedSequence) -> list[dict]:
        events, seq.traced_events = seq.guard.events[seq.traced_events:], len(seq.guard.events)
        return events

    def _emit(self, index: int, piece: str) -> None:
        if piece:
            self.sequences[index].text += piece
            if self.on_text is not None:
                self.on_text(index, piece)


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
    if p_unsafe is not None and (isinstance(p_unsafe, bool) or not isinstance(p_unsafe, (int, float))
                                 or not math.isfinite(p_unsafe) or not 0 <= p_unsafe <= 1):
        raise ValueError(f"the classifier answered p_unsafe {p_unsafe!r}")
    return verdict, {k: v for k, v in result.items() if k != "verdict"}
