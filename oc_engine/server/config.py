"""`ServerConfig`: what the operator decides for `oc-engine serve` (its options map onto these
fields), apart from the engine's and the guard's settings. Importing it loads no web framework."""

from __future__ import annotations

from dataclasses import dataclass

from oc_engine.config import check_bool, check_int
from oc_engine.config_fields import is_number
from oc_engine.errors import OcEngineError


@dataclass(frozen=True)
class ServerConfig:
    """model_name: the name clients send as `model` (and `/v1/models` lists).
    api_key: required as `Authorization: Bearer <key>` on /v1 routes (and /metrics) when set.
    max_waiting: requests accepted beyond the engine's slots; past it, 429.
    allow_guard_override: let a request weaken the guard (see `guard_policy`).
    audit_log: a JSONL file the guard's events are appended to (see `audit`), rotated past
    `audit_max_bytes` into `audit_backups` older files; audit_required: a failed write stops
    the release of guarded text and fails /health (fail closed).
    guard_details: send clients the guard's details (see `responses`); off, a response depends
    only on what was shown and on whether the guard ended it.
    max_body_bytes, max_messages, max_message_chars, max_stop_chars: refused (413, 400) before
    any templating or tokenization; max_tokens_limit: the most `max_tokens` a request may ask for (400 past it),
    and what one that asks for none gets (None: the rest of the model's context).
    metrics_public: /metrics answers without the API key (it tells request counts, blocks and
    fail-closed events: the key guards it by default).
    limit_concurrency: requests in progress past which a new one gets a 503 at once;
    keep_alive_s: how long an idle connection stays open; graceful_shutdown_s: after SIGTERM,
    how long running requests may take to finish before they are cut.
    console: the guard console at `/` (see `console`): static files; what it shows comes through
    the API, behind the key, and its trace only with `guard_details`."""

    model_name: str
    api_key: str | None = None
    max_waiting: int = 64
    allow_guard_override: bool = False
    audit_log: str | None = None
    audit_max_bytes: int = 100 * 2 ** 20
    audit_backups: int = 5
    audit_required: bool = False
    guard_details: bool = False
    max_body_bytes: int = 8 * 2 ** 20
    max_messages: int = 512
    max_message_chars: int = 256 * 2 ** 10
    max_stop_chars: int = 256
    max_tokens_limit: int | None = None
    metrics_public: bool = False
    limit_concurrency: int = 512
    keep_alive_s: float = 5.0
    graceful_shutdown_s: float = 120.0
    console: bool = True

    def __post_init__(self):
        for name in ("max_body_bytes", "max_messages", "max_message_chars", "max_stop_chars", "audit_max_bytes",
                     "limit_concurrency"):
            check_int(name, getattr(self, name), 1)
        check_int("max_waiting", self.max_waiting, 0)
        if self.max_tokens_limit is not None:
            check_int("max_tokens_limit", self.max_tokens_limit, 1)
        check_int("audit_backups", self.audit_backups, 0)
        for name in ("keep_alive_s", "graceful_shutdown_s"):
            value = getattr(self, name)
            if not is_number(value) or not 0 < value < float("inf"):
                raise OcEngineError(f"{name} must be a positive number of seconds, got {value!r}")
        check_bool("console", self.console)
        if self.audit_required and self.audit_log is None:
            raise OcEngineError("audit_required needs an audit log (--audit-log FILE)")
        if self.api_key is not None and not self.api_key.strip():
            raise OcEngineError("the API key must not be empty")
        if not self.model_name:
            raise OcEngineError("the served model name must not be empty")
