"""OpenAI response objects and stream chunks, built from oc-engine's typed results.

Every response carries an `oc_engine` object. A blocked answer ends with the refusal as its
last content and `finish_reason: "content_filter"`, OpenAI's value for filtered output.

What a client sees of an answer depends only on what was shown and on whether the guard ended
it: `usage.completion_tokens` counts the tokens released, and the `oc_engine` object holds the
status, the refusal and that count. The guard's details (pause points, verdicts with
p(unsafe), the reason, the tokens generated, timings; in a stream, a chunk per pause and
verdict) would let a client probe the text it was never shown, or tune an attack against both
stages; they are sent only where the operator allows it (`serve --guard-details`). The metrics
and the audit log always have them.
"""

from __future__ import annotations

import dataclasses
import time

from oc_engine.outputs import Completion, Paused, TokenScored, VerdictReceived

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "cancelled"}


def finish_reason(completion: Completion) -> str:
    """OpenAI's finish_reason: content_filter whenever the guard ended the answer (a block, or a
    failed check that showed nothing more)."""
    guard = completion.guard
    if completion.finish_reason == "cancelled":  # its guard may still hold tokens: it reports "held"
        return "cancelled"
    if completion.finish_reason == "guard" or (guard is not None and guard.status in ("blocked", "held")):
        return "content_filter"
    return FINISH_REASONS.get(completion.finish_reason, "stop")


def guard_json(completion: Completion, details: bool = False) -> dict:
    """The `oc_engine` object of a finished request; `details`: the guard's details too."""
    guard = completion.guard
    out = {"guarded": guard is not None, "released_tokens": len(completion.token_ids)}
    if guard is not None:
        out.update(status=guard.status, refusal=completion.refusal)
    if details:
        out.update(generated_tokens=completion.generated_tokens, timings=dataclasses.asdict(completion.timings))
        if guard is not None:
            out.update(reason=guard.reason, pause_points=list(guard.pause_points),
                       verdicts=[dataclasses.asdict(v) for v in guard.verdicts])
    return out


def event_json(event) -> dict | None:
    """A guard event while streaming (sent only with the guard's details): a token's score (to
    a request that asked for a trace), a pause (the text after it is held) or a verdict."""
    if isinstance(event, TokenScored):
        return {"event": "score", "token_index": event.token_index, "score": event.score, "ema": event.ema}
    if isinstance(event, Paused):
        return {"event": "paused", "token_index": event.token_index}
    if isinstance(event, VerdictReceived):
        return {"event": "verdict", **dataclasses.asdict(event.verdict)}
    return None


def usage(completion: Completion) -> dict:
    """Tokens the client was shown, not those generated: a count of withheld tokens would say
    where in the text it never saw the guard (or a stop string) ended the answer."""
    prompt, released = len(completion.prompt_token_ids), len(completion.token_ids)
    return {"prompt_tokens": prompt, "completion_tokens": released, "total_tokens": prompt + released}


class ResponseBuilder:
    """Responses of one request to one endpoint (`chat` or `text` completions)."""

    def __init__(self, request_id: str, model: str, chat: bool, details: bool = False):
        self.id, self.model, self.chat, self.details = request_id, model, chat, details
        self.created = int(time.time())
        self._role_sent = False

    def _base(self, object_name: str) -> dict:
        return {"id": self.id, "object": object_name, "created": self.created, "model": self.model}

    def full(self, completion: Completion) -> dict:
        reason = finish_reason(completion)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": completion.shown_text},
                      "logprobs": None, "finish_reason": reason}
            body = self._base("chat.completion")
        else:
            choice = {"index": 0, "text": completion.shown_text, "logprobs": None, "finish_reason": reason}
            body = self._base("text_completion")
        return {**body, "choices": [choice], "usage": usage(completion),
                "oc_engine": guard_json(completion, self.details)}

    def chunk(self, text: str | None = None, *, finish: str | None = None, oc_engine: dict | None = None,
              include_usage: bool = False) -> dict:
        """One stream chunk: text, a guard event (`oc_engine`, no text), or the finish."""
        if self.chat:
            delta = {}
            if not self._role_sent:
                delta["role"], self._role_sent = "assistant", True
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            body = self._base("chat.completion.chunk")
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            body = self._base("text_completion")
        body["choices"] = [choice]
        if include_usage:
            body["usage"] = None
        if oc_engine is not None:
            body["oc_engine"] = oc_engine
        return body

    def usage_chunk(self, completion: Completion) -> dict:
        """The last chunk with `stream_options.include_usage`: no choices, the usage."""
        object_name = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._base(object_name), "choices": [], "usage": usage(completion)}
