"""Typed results and stream events of the public API (nothing here is a dict read by key)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    """The classifier's answer to one check of the answer's first `covers` tokens."""

    verdict: str  # allow, block, uncertain, error or timeout
    covers: int
    final: bool  # the check of the whole answer, after it ended
    p_unsafe: float | None = None
    latency_ms: float | None = None  # from the check's submission to the verdict's arrival
    error: str | None = None
    input: bool = False  # the check of the prompt alone, before the first token


@dataclass(frozen=True)
class GuardReport:
    """What the guard did to one answer.

    status: completed (all released), blocked (refused), held (failure with on_failure="stop":
    the held tokens were never shown) or streaming (the request was cancelled mid-answer)."""

    status: str
    reason: str | None
    pause_points: tuple[int, ...]  # token indices where the probe paused the answer
    verdicts: tuple[Verdict, ...]
    released_tokens: int  # the first this-many generated tokens were shown


@dataclass(frozen=True)
class Timings:
    queued_ms: float  # from add_request to the prefill's start (waiting for a free slot)
    prefill_ms: float
    ttft_ms: float  # from add_request to the first token
    decode_tokens_per_s: float | None  # tokens after the first over the decode time, compilation excluded
    total_ms: float  # from add_request to the finish
    first_text_ms: float | None = None  # from add_request to the first text shown (None: nothing was)


@dataclass(frozen=True)
class Completion:
    """One request's result. `text` and `token_ids` are what was released to the user; a blocked
    answer's refusal is kept apart in `refusal` (it follows the released text)."""

    request_id: str
    prompt: str | None  # None when the request was given as token ids
    prompt_token_ids: tuple[int, ...]
    text: str
    token_ids: tuple[int, ...]
    finish_reason: str  # eos, stop (a stop string), length, guard or cancelled
    refusal: str | None
    guard: GuardReport | None  # None when generation was unguarded
    timings: Timings
    generated_tokens: int  # tokens the model produced, shown or not

    @property
    def shown_text(self) -> str:
        """What the user saw: the released text, then the refusal (if blocked) on a line of its own."""
        return self.text if self.refusal is None else self.text + refusal_piece(self.text, self.refusal)


def refusal_piece(shown: str, refusal: str) -> str:
    """The refusal as it follows the text already shown: on a line of its own."""
    return ("\n" if shown and not shown.endswith("\n") else "") + refusal


# -- stream events (`LLM.stream`, `LLM.step`) -------------------------------------------

@dataclass(frozen=True)
class TextReleased:
    request_id: str
    text: str


@dataclass(frozen=True)
class Paused:
    """The probe paused the answer at `token_index`: it and what follows are held for a verdict."""

    request_id: str
    token_index: int


@dataclass(frozen=True)
class VerdictReceived:
    request_id: str
    verdict: Verdict


@dataclass(frozen=True)
class TokenScored:
    """The probe's score and EMA for generated token `token_index` (None: not finite, which
    pauses). Sent only to a request that asked for them (`prepare_request(trace=True)`): a
    number per token, never the token, so a held one shows nothing of its text."""

    request_id: str
    token_index: int
    score: float | None
    ema: float | None


@dataclass(frozen=True)
class Refused:
    """The answer was blocked: `text` (the refusal) is shown after the released text, and it ends."""

    request_id: str
    text: str


@dataclass(frozen=True)
class Finished:
    request_id: str
    completion: Completion


Event = TextReleased | TokenScored | Paused | VerdictReceived | Refused | Finished
