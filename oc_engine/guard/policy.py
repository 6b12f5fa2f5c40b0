"""The guard policy for one sequence: plain Python, no torch, testable on its own.

Tokens arrive with the probe's flags (bit 1: EMA >= warn, bit 2: EMA >= pause, bit 4: the
score or the EMA is not a finite number). While STREAMING a token is released at once. A
pause flag (checked every `every` tokens; a non-finite flag on every token, whatever the
cadence) makes that token a pause point: it and everything after it are HELD, and a
classifier check of the answer up to and including the pause point is requested.

Every check's input is a function of the tokens and the configuration alone, never of
timing: a check covers the answer up to its pause point (the tokens the blocking design,
which stops decoding at a pause until its verdict, would have made by then), or the whole
answer at the final check. Decoding goes on while a check runs; the tokens made meanwhile are
held. Verdicts:

- allow: release the tokens the check covered, re-arm, and judge the tokens made meanwhile as
  if they arrived now, with the probe flags they were scored with ("replay"): up to the first
  one that pauses they are released; that one is a new pause point, held with everything
  after it, and its check covers the answer up to it. So the shown text, the checks asked and
  the verdicts are those of the blocking design, however long each verdict takes.
- block: discard the held tokens, emit the refusal, stop the sequence (BLOCKED).
- uncertain: `uncertain="block"` treats it as block; `"final"` keeps holding everything and
  lets the final check (the whole answer, once it ends) decide; uncertain there blocks.
- error, timeout, or no classifier at all: fail closed. Held tokens are never released;
  `on_failure="block"` emits the refusal, `"stop"` just stops (status "held").

`final_check=True`: when the sequence ends, the whole answer is judged before its last held
tokens are released (unless an allow already covered all of it). `None` (the default) is
resolved per request by the front end (`for_request`): on when nothing is shown before the end
(a non-streaming call) and a classifier is configured; the policy itself treats None as off.
`hold_all=True` (what a non-streaming call resolves to with its final check): the policy runs
as above, but nothing is shown before the answer is done (its final verdict, if due): a
blocked answer shows only the refusal.
Past `max_held` held tokens, the engine pauses that sequence's decoding until its verdict
arrives (`must_wait`); while holding for the final check, reaching `max_held` ends the answer
there and judges it.

`input_check=True`: before the first token is shown, the prompt is judged with an empty answer
(`start()`, while the prompt is prefilled). Every token is held until that verdict: allow
replays them as if they had just arrived; block refuses with no model token shown; uncertain
lets the answer stream under the probe, but its final check becomes due (`uncertain="block"`:
blocks); an error or timeout fails closed.

The guard returns what to do as a list of actions; the engine carries them out.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from oc_engine.config_fields import is_int, is_number

WARN, PAUSE, NONFINITE = 1, 2, 4

STREAMING, HELD, BLOCKED, STOPPED, DONE = "streaming", "held", "blocked", "stopped", "done"
VERDICTS = ("allow", "block", "uncertain", "error", "timeout")
DEFAULT_REFUSAL = "I can't help with that."
MAX_DEADLINE_S = 3600.0  # a verdict later than an hour is a failure; larger values overflow timers


def token_flags(flags: int, score: float | None, ema: float | None) -> int:
    """The flags the policy acts on: a non-finite score or EMA pauses whatever the flags say
    (a NaN compares false with every threshold, so the kernel's own flags could miss it)."""
    if any(value is not None and not math.isfinite(value) for value in (score, ema)):
        return int(flags) | WARN | PAUSE | NONFINITE
    return int(flags)


@dataclass(frozen=True)
class GuardConfig:
    every: int = 1
    uncertain: str = "final"  # "final" or "block"
    on_failure: str = "block"  # "block" or "stop"
    final_check: bool | None = None  # None: decided per request (on for non-streaming calls)
    hold_all: bool | None = None  # show nothing before the end (the final verdict); None: as final_check, per request
    input_check: bool = False
    max_held: int = 64
    deadline_s: float = 5.0
    refusal: str = DEFAULT_REFUSAL

    def __post_init__(self):
        from oc_engine.errors import OcEngineError

        for name in ("every", "max_held"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise OcEngineError(f"guard {name.replace('_', ' ')} must be an integer >= 1, got {value!r}")
        if self.uncertain not in ("final", "block"):
            raise OcEngineError(f"uncertain must be 'final' or 'block', got {self.uncertain!r}")
        if self.on_failure not in ("block", "stop"):
            raise OcEngineError(f"on_failure must be 'block' or 'stop', got {self.on_failure!r}")
        if not is_number(self.deadline_s) or not 0 < self.deadline_s <= MAX_DEADLINE_S:
            raise OcEngineError(f"classifier deadline must be in (0, {MAX_DEADLINE_S:.0f}] s, got {self.deadline_s!r}")
        if not isinstance(self.refusal, str):
            raise OcEngineError(f"refusal must be text, got {self.refusal!r}")
        if not isinstance(self.final_check, bool) and self.final_check is not None:
            raise OcEngineError(f"final_check must be true, false or None (auto), got {self.final_check!r}")
        if not isinstance(self.hold_all, bool) and self.hold_all is not None:
            raise OcEngineError(f"hold_all must be true, false or None (auto), got {self.hold_all!r}")
        if not isinstance(self.input_check, bool):
            raise OcEngineError(f"input_check must be true or false, got {self.input_check!r}")

    def for_request(self, streaming: bool, has_classifier: bool = True) -> "GuardConfig":
        """This policy with `final_check=None` and `hold_all=None` resolved: when the answer does
        not stream and a classifier is there to ask (without one, every answer would fail
        closed), the whole answer is judged and nothing of it is shown before that verdict."""
        from dataclasses import replace

        final = self.final_check if self.final_check is not None else not streaming and has_classifier
        hold = self.hold_all if self.hold_all is not None else not streaming and final
        return replace(self, final_check=final, hold_all=hold)


@dataclass(frozen=True)
class Release:
    start: int  # token indices [start, stop) may be shown
    stop: int


@dataclass(frozen=True)
class Check:
    covers: int  # judge the answer made of tokens [0, covers)
    final: bool = False
    input: bool = False  # the check before the first token (covers 0: the prompt alone)


@dataclass(frozen=True)
class Refuse:
    text: str  # emitted after the last released token; the sequence stops


@dataclass(frozen=True)
class Stop:
    reason: str


@dataclass
class SequenceGuard:
    config: GuardConfig
    state: str = STREAMING
    num_tokens: int = 0
    released: int = 0  # tokens [0, released) are cleared by the policy (shown, unless hold_all)
    shown: int = 0  # tokens [0, shown) have been shown
    allowed: int = 0  # the largest cover an allow verdict has given
    pending: Check | None = None  # the check in flight, at most one
    hold_for_final: bool = False  # an uncertain verdict: keep holding until the final check
    final_due: bool = False  # the input check was uncertain: the final check is due whatever the config
    finished: bool = False  # the model stopped producing tokens
    reason: str | None = None
    flags: list[int] = field(default_factory=list)  # every token's probe flags, replayed after an allow
    pause_points: list[int] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    # -- inputs -------------------------------------------------------------------------
    def start(self) -> list:
        """The request begins (before its first token): with `input_check`, hold from the start
        and judge the prompt alone."""
        if not self.config.input_check or self.num_tokens or self.pending is not None or self.state != STREAMING:
            return []
        self.state = HELD
        self.events.append({"event": "input_check"})
        return self._request(Check(covers=0, input=True))

    def on_token(self, flags: int) -> list:
        """A new token with its probe flags (see `token_flags`)."""
        if self.finished or self.state in (BLOCKED, STOPPED, DONE):
            return []
        index = self.num_tokens
        self.num_tokens += 1
        self.flags.append(int(flags))
        if self.state == STREAMING:
            return self._hold_at(index) if self._pauses_at(index) else self._release_all()
        if self.hold_for_final and self.num_tokens - self.released >= self.config.max_held:
            return self._cap()
        return []  # HELD: the token waits with the others

    def on_verdict(self, check: Check, verdict: str, detail: dict | None = None) -> list:
        """The classifier's answer to `check` (allow, block, uncertain, error, timeout)."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}")
        if check != self.pending or self.state in (BLOCKED, STOPPED, DONE):
            return []
        self.pending = None
        self.events.append({"event": "verdict", "verdict": verdict, "covers": check.covers,
                            "produced": self.num_tokens, "final": check.final, **(detail or {})})
        if check.input:
            return self._input_verdict(verdict)
        if verdict == "allow":
            self.released = max(self.released, check.covers)
            actions = self._show_upto(self.released)
            self.allowed = max(self.allowed, check.covers)
            if check.final:
                return actions + self._done()
            return actions + self._replay()
        if verdict == "block" or (verdict == "uncertain" and self.config.uncertain == "block"):
            return self._block(f"classifier verdict: {verdict}")
        if verdict == "uncertain" and check.final:  # nothing later can decide: fail closed
            return self._block("classifier uncertain at the final check")
        if verdict == "uncertain":
            self.hold_for_final = True
            if not self.finished and self.num_tokens - self.released >= self.config.max_held:
                return self._cap()
            return self._request_final() if self.finished else []
        return self._fail_closed(f"classifier {verdict}")

    def on_finish(self) -> list:
        """The model produced its last token (EOS, stop string or length)."""
        if self.finished or self.state in (BLOCKED, STOPPED, DONE):
            return []
        self.finished = True
        if self.state == HELD:  # the check in flight decides; holding for the final check: ask it now
            return self._request_final() if self.pending is None else []
        return self._end()

    def on_no_classifier(self) -> list:
        """A check was wanted but no classifier is configured: fail closed at once."""
        if self.pending is None or self.state in (BLOCKED, STOPPED, DONE):
            return []
        self.pending = None
        return self._fail_closed("no classifier configured")

    # -- queries ------------------------------------------------------------------------
    @property
    def must_wait(self) -> bool:
        """Decoding of this sequence pauses: too many held tokens, or nothing more is wanted."""
        if self.state in (BLOCKED, STOPPED, DONE):
            return True
        return self.state == HELD and self.num_tokens - self.released >= self.config.max_held

    @property
    def wants_tokens(self) -> bool:
        """Should the engine keep decoding this sequence?"""
        return not self.finished and self.state not in (BLOCKED, STOPPED, DONE)

    @property
    def status(self) -> str:
        if self.state == BLOCKED:
            return "blocked"
        if self.state == STOPPED or (self.state == HELD and self.shown < self.num_tokens):
            return "held"
        return "completed" if self.state == DONE else "streaming"

    # -- internals ----------------------------------------------------------------------
    def _input_verdict(self, verdict: str) -> list:
        if verdict == "block" or (verdict == "uncertain" and self.config.uncertain == "block"):
            return self._block(f"input check: {verdict}")
        if verdict in ("allow", "uncertain"):
            self.final_due = verdict == "uncertain"
            return self._replay()  # the tokens made meanwhile, as if they arrived now
        return self._fail_closed(f"input check: classifier {verdict}")

    def _pauses_at(self, index: int) -> bool:
        """Token `index` arrives while streaming: do its flags make it a pause point? A pause
        flag counts at the cadence; a non-finite score or EMA counts on every token."""
        flags = self.flags[index]
        if flags & NONFINITE or (flags & PAUSE and (index + 1) % self.config.every == 0):
            return True
        if flags & WARN and (index + 1) % self.config.every == 0:
            self.events.append({"event": "warn", "token": index})
        return False

    def _hold_at(self, index: int) -> list:
        """Token `index` is a pause point: hold it and what follows; judge the answer up to it."""
        self.state = HELD
        self.pause_points.append(index)
        event = {"event": "pause", "token": index}
        if self.flags[index] & NONFINITE:
            event["nonfinite"] = True
        self.events.append(event)
        return self._request(Check(covers=index + 1))

    def _replay(self) -> list:
        """After an allow: re-arm at the released point and judge the held tokens as if they arrived now."""
        self.state = STREAMING
        self.events.append({"event": "rearm", "token": self.released})
        for index in range(self.released, self.num_tokens):
            if self._pauses_at(index):
                self.released = index
                return self._show_upto(index) + self._hold_at(index)
        actions = self._release_all()
        return actions + (self._end() if self.finished else [])

    def _cap(self) -> list:
        """Holding for the final check with `max_held` tokens held: the answer ends there (tokens
        decoded past it, while the verdict was on its way, are dropped) and is judged whole."""
        end = self.released + self.config.max_held
        del self.flags[end:]
        self.num_tokens = min(self.num_tokens, end)
        self.events.append({"event": "cap", "token": self.num_tokens - 1})
        self.finished = True
        return self._request_final()

    def _end(self) -> list:
        """Every token is released and the answer has ended: the final check, if one is due."""
        if (self.config.final_check or self.final_due) and self.allowed < self.num_tokens:
            self.state = HELD
            return self._request_final()
        return self._done()

    def _request(self, check: Check) -> list:
        self.pending = check
        return [check]

    def _request_final(self) -> list:
        return [] if self.pending is not None else self._request(Check(covers=self.num_tokens, final=True))

    def _release_all(self) -> list:
        self.released = self.num_tokens
        return self._show_upto(self.num_tokens)

    def _show_upto(self, stop: int) -> list:
        """Show the cleared tokens up to `stop`; with hold_all, nothing before the answer is done."""
        if self.config.hold_all and self.state != DONE:
            return []
        start, self.shown = self.shown, max(self.shown, stop)
        return [Release(start, stop)] if stop > start else []

    def _done(self) -> list:
        self.state = DONE
        return self._show_upto(self.num_tokens)

    def _block(self, reason: str) -> list:
        self.state, self.reason = BLOCKED, reason
        self.events.append({"event": "block", "reason": reason})
        return [Refuse(self.config.refusal), Stop(reason)]

    def _fail_closed(self, reason: str) -> list:
        if self.config.on_failure == "block":
            return self._block(reason)
        self.state, self.reason = STOPPED, reason
        self.events.append({"event": "stop", "reason": reason})
        return [Stop(reason)]
