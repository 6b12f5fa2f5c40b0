"""The audit log (`--audit-log FILE`): one JSON line per guard event, appended and flushed.

Events: `pause`, `verdict`, `fail_closed` (a check that errored or missed its deadline),
`block` (the answer was replaced by the refusal), and `error` (a request refused before it ran:
its id and the error only). Each guard line has the request id, the time, the prompt, the text
released so far, the text held back at that moment, and the verdicts so far. Credentials never
reach it: the server hands it requests, not headers.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from pathlib import Path

from oc_engine.errors import OcEngineError
from oc_engine.outputs import Paused, Refused, VerdictReceived


class AuditLog:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 - open for the server's life
        except OSError as exc:
            raise OcEngineError(f"--audit-log {path}: {exc.strerror or exc}") from exc
        self._lock = threading.Lock()

    def observe(self, seq, events: list) -> None:
        """An `AsyncEngine` observer: called on the engine thread with one request's events."""
        monitor = seq.guard
        if monitor is None:
            return
        for event in events:
            if isinstance(event, Paused):
                self._guard_line("pause", seq, token_index=event.token_index)
            elif isinstance(event, VerdictReceived):
                verdict = _verdict(event.verdict)
                self._guard_line("verdict", seq, verdict=verdict)
                if event.verdict.verdict in ("error", "timeout"):
                    self._guard_line("fail_closed", seq, reason=event.verdict.verdict, error=event.verdict.error)
            elif isinstance(event, Refused):
                self._guard_line("block", seq, refusal=event.text, reason=monitor.policy.reason)

    def error(self, request_id: str, status: int, message: str) -> None:
        self._write({"event": "error", "request_id": request_id, "status": status, "error": message})

    def close(self) -> None:
        with self._lock:
            self._file.close()

    def _guard_line(self, kind: str, seq, **fields) -> None:
        monitor = seq.guard
        shown = monitor.policy.shown
        held = monitor.tokenizer.decode(seq.token_ids[shown:], skip_special_tokens=True)
        self._write({"event": kind, "request_id": seq.request_id, "prompt": monitor.conversation,
                     "released_text": monitor.text, "held_text": held, **fields,
                     "verdicts": [_verdict(v) for v in monitor.verdicts]})

    def _write(self, record: dict) -> None:
        record = {"time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds"), **record}
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self._lock:
            self._file.write(line)
            self._file.flush()


def _verdict(verdict) -> dict:
    return {"verdict": verdict.verdict, "covers": verdict.covers, "final": verdict.final, "input": verdict.input,
            "p_unsafe": verdict.p_unsafe, "latency_ms": verdict.latency_ms, "error": verdict.error}
