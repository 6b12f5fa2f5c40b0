"""`Sequence`: everything of one request, in one object (plain Python, no torch).

Its life: WAITING (queued) -> RUNNING (holds a cache slot, decoding) -> DRAINING (decoding is
over and its slot is free, but a verdict is still on its way) -> FINISHED. The engine appends
tokens with `append_token`, which applies the stop strings, EOS and the token limit; the
guard (a `SequenceMonitor`, when the request is guarded) decides what of it is shown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from oc_engine.engine.text_stream import TextStream
from oc_engine.params import SamplingParams

WAITING, RUNNING, DRAINING, FINISHED = "waiting", "running", "draining", "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    key: int  # this request's random stream (see `sampling`)
    limit: int  # max new tokens, after the model's length limit
    stream: TextStream  # the model's text, stop strings applied
    prompt: str | None = None  # the prompt text, when it was given as text
    guard: Any = None  # a SequenceMonitor, or None for unguarded generation
    collect_taps: bool = False
    keep_events: bool = True  # False: events are dropped (a caller that only wants the Completion)
    status: str = WAITING
    slot: int | None = None
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the model's text (what a guard releases may be less)
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
    def decoding_done(self) -> bool:
        return self.finish_reason is not None

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
        self.text += piece
        return piece

    def emit(self, events: list) -> None:
        if self.keep_events:
            self.events.extend(events)

    def take_events(self) -> list:
        events, self.events = self.events, []
        return events
