"""The guard policy for one sequence: plain Python, no torch, testable on its own.

Tokens arrive with the probe's flags (bit 1: EMA >= warn, bit 2: EMA >= pause). While
STREAMING a token is released at once. A pause flag (checked every `every` tokens) makes
that token a pause point: it and everything after it are HELD, and a classifier check of
the partial answer is requested. Verdicts:

- allow: release the held tokens the check covered. If more tokens arrived meanwhile, they
  are still held and a follow-up check covering them is requested; once a verdict covers
  every held token the guard re-arms (STREAMING).
- block: discard the held tokens, emit the refusal, stop the sequence (BLOCKED).
- uncertain: `uncertain="block"` treats it as block; `"final"` keeps holding everything and
  lets the final check (at the end of the sequence) decide; uncertain there blocks.
- error, timeout, or no classifier at all: fail closed. Held tokens are never released;
  `on_failure="block"` emits the refusal, `"stop"` just stops (status "held").

`final_check=True`: when the sequence ends, the whole answer is judged before its last held
tokens are released. Past `max_held` held tokens, the engine pauses that sequence's decoding
until its verdict arrives (`must_wait`).

Catching up (`catch_up`): a check judges the answer as it was when submitted, and tokens keep
arriving while it runs, so an allow usually leaves some tokens uncovered. Three ways on:
- "replay" (the default): the guard re-arms at the check's cover and judges the uncovered
  tokens as if they arrived now, with the probe flags they were scored with: up to the first
  one that pauses they are released, from there on they are held for a new check covering
  every token made so far. The shown text is what the blocking design (stop at a pause,
  classify, resume) would show for the same tokens, and decoding never waits for it.
- "wait": the engine pauses that sequence for one follow-up check that covers them, then
  the guard re-arms; every token made while held is judged by the classifier, at the cost of
  one stall of a step plus a check.
- "overlap": decoding never waits below `max_held`, follow-up checks cover the uncovered
  tokens; when a check takes longer than a token (always, on a CPU whose cores decoding
  already uses) they chase the answer and the guard may never re-arm.

The guard returns what to do as a list of actions; the engine carries them out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

WARN, PAUSE = 1, 2

STREAMING, HELD, BLOCKED, STOPPED, DONE = "streaming", "held", "blocked", "stopped", "done"
VERDICTS = ("allow", "block", "uncertain", "error", "timeout")
DEFAULT_REFUSAL = "I can't help with that."
CATCH_UPS = ("replay", "wait", "overlap")


@dataclass(frozen=True)
class GuardConfig:
    every: int = 1
    uncertain: str = "final"  # "final" or "block"
    on_failure: str = "block"  # "block" or "stop"
    final_check: bool = False
    max_held: int = 64
    deadline_s: float = 5.0
    refusal: str = DEFAULT_REFUSAL
    catch_up: str = "replay"  # "replay", "wait" or "overlap" (see the module docstring)

    def __post_init__(self):
        from oc_engine.errors import OcEngineError

        if self.every < 1:
            raise OcEngineError(f"guard cadence must be >= 1, got {self.every}")
        if self.uncertain not in ("final", "block"):
            raise OcEngineError(f"uncertain must be 'final' or 'block', got {self.uncertain!r}")
        if self.on_failure not in ("block", "stop"):
            raise OcEngineError(f"on_failure must be 'block' or 'stop', got {self.on_failure!r}")
        if self.catch_up not in CATCH_UPS:
            raise OcEngineError(f"catch_up must be one of {', '.join(CATCH_UPS)}, got {self.catch_up!r}")
        if self.max_held < 1:
            raise OcEngineError(f"max held tokens must be >= 1, got {self.max_held}")
        if not self.deadline_s > 0:
            raise OcEngineError(f"classifier deadline must be > 0 s, got {self.deadline_s}")


@dataclass(frozen=True)
class Release:
    start: int  # token indices [start, stop) may be shown
    stop: int


@dataclass(frozen=True)
class Check:
    covers: int  # judge the answer made of tokens [0, covers)
    final: bool = False


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
    released: int = 0  # tokens [0, released) have been shown
    pending: Check | None = None  # the check in flight, at most one
    hold_for_final: bool = False  # an uncertain verdict: keep holding until the final check
    finished: bool = False  # the model stopped producing tokens
    catching_up: bool = False  # a follow-up check after an allow is pending; decoding waits for it
    reason: str | None = None
    flags: list[int] = field(default_factory=list)  # every token's probe flags, for "replay"
    pause_points: list[int] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)

    # -- inputs -------------------------------------------------------------------------
    def on_token(self, flags: int) -> list:
        """A new token with its probe flags."""
        if self.state in (BLOCKED, STOPPED, DONE):
            return []
        index = self.num_tokens
        self.num_tokens += 1
        self.flags.append(flags)
        if self.state == STREAMING:
            if self._pauses_at(index):
                return self._request(Check(covers=self.num_tokens))
            return self._release_all()
        if self.hold_for_final and self.num_tokens - self.released >= self.config.max_held:
            # Holding for the final check, and the cap is reached: end the answer here and judge it.
            self.events.append({"event": "cap", "token": index})
            self.finished = True
        return self._request_follow_up()  # HELD: the token waits with the others

    def on_verdict(self, check: Check, verdict: str, detail: dict | None = None) -> list:
        """The classifier's answer to `check` (allow, block, uncertain, error, timeout)."""
        if verdict not in VERDICTS:
            raise ValueError(f"unknown verdict {verdict!r}")
        if check != self.pending or self.state in (BLOCKED, STOPPED, DONE):
            return []
        self.pending = None
        self.catching_up = False
        self.events.append({"event": "verdict", "verdict": verdict, "covers": check.covers,
                            "produced": self.num_tokens, "final": check.final, **(detail or {})})
        if verdict == "allow":
            actions = [Release(self.released, check.covers)] if check.covers > self.released else []
            self.released = max(self.released, check.covers)
            if self.released == self.num_tokens and not self.hold_for_final:
                self.state = STREAMING  # re-armed
                return actions + (self._done() if self.finished else [])
            if self.config.catch_up == "replay" and not self.hold_for_final:
                return actions + self._replay()
            follow_up = self._request_follow_up()
            self.catching_up = bool(follow_up) and self.config.catch_up == "wait"
            return actions + follow_up
        if verdict == "block" or (verdict == "uncertain" and self.config.uncertain == "block"):
            return self._block(f"classifier verdict: {verdict}")
        if verdict == "uncertain" and check.final:  # nothing later can decide: fail closed
            return self._block("classifier uncertain at the final check")
        if verdict == "uncertain":
            self.hold_for_final = True
            return self._request_follow_up()
        return self._fail_closed(f"classifier {verdict}")

    def on_finish(self) -> list:
        """The model produced its last token (EOS, stop string or length)."""
        if self.finished or self.state in (BLOCKED, STOPPED, DONE):
            return []
        self.finished = True
        if self.config.final_check or self.state == HELD:
            self.state = HELD
            return self._request_follow_up()
        return self._done()

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
        return self.state == HELD and (self.catching_up or self.num_tokens - self.released >= self.config.max_held)

    @property
    def wants_tokens(self) -> bool:
        """Should the engine keep decoding this sequence?"""
        return not self.finished and self.state not in (BLOCKED, STOPPED, DONE)

    @property
    def status(self) -> str:
        if self.state == BLOCKED:
            return "blocked"
        if self.state == STOPPED or (self.state == HELD and self.released < self.num_tokens):
            return "held"
        return "completed" if self.state == DONE else "streaming"

    # -- internals ----------------------------------------------------------------------
    def _pauses_at(self, index: int) -> bool:
        """Token `index` arrives while streaming: does its pause flag (at the cadence) hold it?"""
        if (index + 1) % self.config.every:
            return False
        if self.flags[index] & PAUSE:
            self.state = HELD
            self.pause_points.append(index)
            self.events.append({"event": "pause", "token": index})
            return True
        if self.flags[index] & WARN:
            self.events.append({"event": "warn", "token": index})
        return False

    def _replay(self) -> list:
        """Re-arm at the released point and judge the uncovered tokens as if they arrived now."""
        self.state = STREAMING
        self.events.append({"event": "rearm", "token": self.released})
        for index in range(self.released, self.num_tokens):
            if self._pauses_at(index):
                start, self.released = self.released, index
                released = [Release(start, index)] if index > start else []
                return released + self._request_follow_up()  # covers every token made so far
        actions = self._release_all()
        if not self.finished:
            return actions
        if self.config.final_check:  # the answer ended while held: end it as on_finish would
            self.state = HELD
            return actions + self._request_follow_up()
        return actions + self._done()

    def _request(self, check: Check) -> list:
        self.pending = check
        return [check]

    def _request_follow_up(self) -> list:
        """Ask for a check covering everything held, unless one is in flight or not yet due."""
        if self.pending is not None:
            return []
        if self.hold_for_final and not self.finished:
            return []
        if self.finished:
            return self._request(Check(covers=self.num_tokens, final=True))
        return self._request(Check(covers=self.num_tokens))

    def _release_all(self) -> list:
        start, self.released = self.released, self.num_tokens
        return [Release(start, self.num_tokens)] if self.num_tokens > start else []

    def _done(self) -> list:
        self.state = DONE
        return []

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
