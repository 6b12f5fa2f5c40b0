"""Which guard a request gets: the server's, made stricter by the request, never weaker unless
the server was started with `--allow-guard-override`.

Stricter means: an input check or a final check added, a shorter cadence, uncertain verdicts
blocked, a shorter deadline, fewer tokens held, holding the whole answer. Anything else a
request asks (no guard, a longer cadence or deadline, more held tokens, dropping a check the
server makes) is an override.
"""

from __future__ import annotations

from dataclasses import replace

from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import GuardConfig
from oc_engine.server.protocol import GuardRequest


class GuardOverrideRefused(OcEngineError):
    """The request would weaken the guard, and this server does not allow it."""


def request_guard(base: GuardConfig | None, asked: GuardRequest | None, *, stream: bool, has_classifier: bool,
                  allow_override: bool) -> GuardConfig | None:
    """The policy for one request (None: unguarded). Raises `GuardOverrideRefused` for a weakening
    the server does not allow, `OcEngineError` for settings that cannot apply."""
    fields = {} if asked is None else asked.policy_fields()
    if not fields:
        return base
    wants_guard = fields.pop("guard", True)
    if base is None:
        if wants_guard:
            raise OcEngineError("oc_engine: this server runs without a guard (started with --no-guard)")
        return None
    if not wants_guard:
        _refuse_unless(allow_override, ["guard: false"])
        return None
    try:
        wanted = replace(base, **fields)
    except OcEngineError as exc:
        raise OcEngineError(f"oc_engine: {exc}") from None
    _refuse_unless(allow_override, weakenings(base, wanted, stream=stream, has_classifier=has_classifier))
    return wanted


def weakenings(base: GuardConfig, wanted: GuardConfig, *, stream: bool, has_classifier: bool) -> list[str]:
    """What `wanted` relaxes compared with `base`, for a request streamed or not."""
    a, b = base.for_request(stream, has_classifier), wanted.for_request(stream, has_classifier)
    found = []
    if b.every > a.every:
        found.append(f"every {b.every} > {a.every}")
    if b.deadline_s > a.deadline_s:
        found.append(f"deadline_s {b.deadline_s} > {a.deadline_s}")
    if b.max_held > a.max_held:  # more decoded past a pause, unseen: the operator's bound on that
        found.append(f"max_held {b.max_held} > {a.max_held}")
    for name in ("input_check", "final_check", "hold_all"):
        if getattr(a, name) and not getattr(b, name):
            found.append(f"{name}: false")
    if a.uncertain == "block" and b.uncertain != "block":
        found.append("uncertain: final")
    return found


def _refuse_unless(allowed: bool, weaker: list[str]) -> None:
    if weaker and not allowed:
        raise GuardOverrideRefused(f"oc_engine: this server does not let a request weaken its guard "
                                   f"({', '.join(weaker)}); start it with --allow-guard-override to allow that")
