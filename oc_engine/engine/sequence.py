"""`Sequence`: everything of one request, in one object (plain Python, no torch).

Its life: WAITING (queued) -> RUNNING (holds a cache slot, decoding) -> DRAINING (decoding is
over and its slot is free, but a verdict is still on its way) -> FINISHED. The engine appends
tokens with `append_token`, which applies the stop strings, EOS and the token limit. It is the
one owner of the request's tokens and text: the guard (a `SequenceMonitor`, when the request
is guarded) reads them here and keeps only its policy state and how far it has released.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from oc_engine.engine.text_stream import TextStream
from oc_engine.outputs import TextReleased
from oc_engine.params import SamplingParams


class Status(str, Enum):
    """Where a request is in its life (a str, so logs and JSON read it as text)."""

    WAITING = "waiting"  # queued, no cache slot
    RUNNING = "running"  # holds a slot, decoding
    DRAINING = "draining"  # decoding over, slot freed, a verdict still on its way
    FINISHED = "finished"  # its Completion is built


WAITING, RUNNING, DRAINING, FINISHED = Status.WAITING, Status.RUNNING, Status.DRAINING, Status.FINISHED


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    key: int  # this request's random stream (see `sampling`)
    limit: int  # max new tokens, after the model's length limit
    stream: TextStream  # the model's text (the one copy of it), stop strings applied
    prompt: str | None = None  # the prompt text, when it was given as text
    guard: Any = None  # a SequenceMonitor, or None for unguarded generation
    collect_taps: bool = False
    keep_events: bool = True  # False: events are dropped (a caller that only wants the Completion)
    status: Status = WAITING
    slot: int | None = None
    prefilled: int = 0  # prompt tokens in its cache slot (a long prompt goes in over several steps)
    token_ids: list[int] = field(default_factory=list)
    text_ends: list[int] = field(default_factory=list)  # len(text) after each token
    finish_reason: str | None = None  # eos, stop, length, guard or cancelled
    scores: list[float] = field(default_factory=list)  # per token probe score, with a probe
    emas: list[float] = field(default_factory=list)
    taps: list[Any] = field(default_factory=list)  # per token [H] or [L, H] tensors, with collect_taps
    token_times: list[float] = field(default_factory=list)  # when each token reached the host (clock)
    arrival: float = 0.0  # clock times (seconds)
    prefill_start: float | None = None
    first_token_at: float | None = None
    first_text_at: float | None = None  # when released text first reached the caller
    finished_at: float | None = None
    decode_end: float | None = None  # its last token (a final verdict may come later)
    events: list = field(default_factory=list)  # undelivered stream events
    completion: Any = None  # the Completion, once FINISHED

    @property
    def text(self) -> str:
        """The model's text that stop strings allow (what a guard releases is a prefix of it)."""
        return self.stream.released

    @property
    def prefilling(self) -> bool:
        """It holds a slot, and its prompt is not all in it yet."""
        return self.status == RUNNING and self.prefilled < len(self.prompt_ids)

    @property
    def decoding_done(self) -> bool:
        return self.finish_reason is not None

    @property
    def reads_states(self) -> bool:
        """Its guard's second stage reads the tapped hidden states of each token (a state reader)."""
        return self.guard is not None and self.guard.states is not None

    def accept(self, token: int, is_eos: bool, score: float | None, ema: float | None, flags: int,
               now: float, state=None) -> list:
        """One decoded token (with its probe score, EMA and flags, None without a probe; `state`
        the tapped hidden states [L, H] that produced it, for a state reader) reached the host
        at `now`: append it, show it to the guard; returns the events it makes. Every engine
        (the native loop, the vLLM driver) hands tokens over here."""
        self.token_times.append(now)
        if self.first_token_at is None:
            self.first_token_at = now
        piece = self.append_token(token, is_eos)
        if score is not None:
            self.scores.append(score)
            self.emas.append(ema)
        if self.guard is None:
            return [TextReleased(self.request_id, piece)] if piece else []
        self.guard.on_token(token, score, ema, flags, state)
        if self.decoding_done:
            self.guard.on_finish()
        self.end_if_guard_stopped()
        return self.guard.take_events()

    def end_if_guard_stopped(self) -> bool:
        """Decoding ends when the guard wants no more tokens (a block, a stop, a final verdict):
        with `append_token`'s own ends (stop, eos, length) and a cancel, the only place a
        finish reason is set. Returns whether decoding is over."""
        if not self.decoding_done and self.guard is not None and not self.guard.wants_tokens:
            self.finish_reason = "guard"
        return self.decoding_done

    def append_token(self, token: int, is_eos: bool) -> str:
        """Add a generated token; returns the model text it makes safe to show (unguarded)."""
        self.token_ids.append(token)
        piece = self.stream.push(token)
        if self.stream.stopped:
            self.finish_reason = "stop"
        elif is_eos and not self.params.ignore_eos:
            self.finish_reason = "eos"
        elif len(self.token_ids) >= self.limit:
            self.finish_reason = "length"
        if self.decoding_done:
            piece += self.stream.finish()
        self.text_ends.append(self.stream.released_chars)
        return piece

    def emit(self, events: list) -> None:
        if self.keep_events:
            self.events.extend(events)

    def take_events(self) -> list:
        events, self.events = self.events, []
        return events
