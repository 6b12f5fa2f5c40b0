"""The audit log (`--audit-log FILE`): one JSON line per event, appended and flushed.

A guarded request's first guard event writes a `request` line with its prompt (every turn);
each later line names the request by id only, so a request's lines grow with its events, not
with its length: `pause`, `verdict` (that verdict), `fail_closed` (a check that errored or
missed its deadline, with the text held back), `block` (the refusal, the text released and
the text withheld), and `end` (the status, finish reason, counts and the text released). An
`error` line is a request refused with an error response (its id, status and message only);
a request without a valid API key is counted in the metrics, not logged, so nobody without a
key can fill the disk. Credentials never reach the log: it is handed requests, not headers.

The file holds prompts and withheld text: it is created 0600 (an existing file is narrowed to
0600), a symbolic link is refused rather than followed, and it rotates by size (FILE.1 ...
FILE.N, the standard library's `RotatingFileHandler`). A write that fails is remembered in
`failed`; with `--audit-required` the server then releases no more guarded text and /health
fails (see `server.app`).
"""

from __future__ import annotations

import datetime as dt
import errno
import json
import logging
import os
import stat
import sys
import threading
from logging.handlers import RotatingFileHandler
from pathlib import Path

from oc_engine.errors import OcEngineError
from oc_engine.outputs import Finished, Paused, Refused, VerdictReceived

log = logging.getLogger("oc_engine.server.audit")


class _PrivateRotatingFile(RotatingFileHandler):
    """Opens without following a symlink, creates 0600, and keeps a write error for the caller
    (`logging` would print it to stderr and carry on)."""

    error: BaseException | None = None

    def _open(self):
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self.baseFilename, flags, 0o600)
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode):
                os.fchmod(fd, 0o600)
            return os.fdopen(fd, "a", encoding="utf-8")
        except BaseException:
            os.close(fd)
            raise

    def handleError(self, record) -> None:
        self.error = sys.exc_info()[1]


class AuditLog:
    def __init__(self, path: str | Path, *, max_bytes: int = 100 * 2 ** 20, backups: int = 5):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._handler = _PrivateRotatingFile(self.path, maxBytes=max_bytes, backupCount=backups,
                                                 encoding="utf-8")
        except OSError as exc:
            reason = "a symbolic link (refused: the log would be written wherever it points)" \
                if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            raise OcEngineError(f"--audit-log {path}: {reason}") from None
        self._lock = threading.Lock()
        self._open_requests: set[str] = set()  # guarded requests whose `request` line is written
        self.failed: str | None = None  # the first write error, if any

    def observe(self, seq, events: list) -> None:
        """An `AsyncEngine` observer: called on the engine thread with one request's events."""
        monitor = seq.guard
        if monitor is None:
            return
        for event in events:
            if isinstance(event, Paused):
                self._guard_line("pause", seq, token_index=event.token_index)
            elif isinstance(event, VerdictReceived):
                self._guard_line("verdict", seq, **_verdict(event.verdict))
                if event.verdict.verdict in ("error", "timeout"):
                    self._guard_line("fail_closed", seq, reason=event.verdict.verdict, error=event.verdict.error,
                                     held_text=_held(seq))
            elif isinstance(event, Refused):
                self._guard_line("block", seq, refusal=event.text, reason=monitor.policy.reason,
                                 released_text=monitor.text, held_text=_held(seq))
            elif isinstance(event, Finished) and seq.request_id in self._open_requests:
                self._open_requests.discard(seq.request_id)
                completion = event.completion
                self._write({"event": "end", "request_id": seq.request_id, "status": monitor.policy.status,
                             "finish_reason": completion.finish_reason, "released_tokens": len(completion.token_ids),
                             "generated_tokens": completion.generated_tokens, "released_text": monitor.text})

    def error(self, request_id: str, status: int, message: str) -> None:
        self._write({"event": "error", "request_id": request_id, "status": status, "error": message})

    def close(self) -> None:
        with self._lock:
            try:
                self._handler.close()
            except OSError:  # the final flush of lines that already failed: `failed` says so
                pass

    def _guard_line(self, kind: str, seq, **fields) -> None:
        if seq.request_id not in self._open_requests:
            self._open_requests.add(seq.request_id)
            self._write({"event": "request", "request_id": seq.request_id, "prompt": seq.guard.conversation})
        self._write({"event": kind, "request_id": seq.request_id, **fields})

    def _write(self, record: dict) -> None:
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), **record}
        line = json.dumps(record, ensure_ascii=False)
        with self._lock:
            self._handler.error = None
            self._handler.handle(logging.makeLogRecord({"msg": line}))
            error = self._handler.error
            if error is not None and self.failed is None:
                self.failed = f"{type(error).__name__}: {error}"
                log.error("the audit log %s cannot be written: %s", self.path, self.failed)


def _held(seq) -> str:
    """The text the guard has not released (the whole answer so far past what was shown)."""
    return seq.stream.text[seq.guard.released_chars:]


def _verdict(verdict) -> dict:
    return {"verdict": verdict.verdict, "covers": verdict.covers, "final": verdict.final, "input": verdict.input,
            "p_unsafe": verdict.p_unsafe, "latency_ms": verdict.latency_ms, "error": verdict.error}
