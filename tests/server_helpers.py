"""Running `oc-engine serve` for tests: as a subprocess (the command users run) or in this
process on a thread (to hand it a tiny model and a scripted classifier), on a free port of
127.0.0.1, ready once `/health` answers 200."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx

from oc_engine.bench.serve import free_port  # noqa: F401 - tests take it from here too

ROOT = Path(__file__).resolve().parents[1]


def wait_healthy(base: str, timeout: float, alive=lambda: True) -> None:
    """Until /health is 200; it must answer 503 (not 200) while the model loads."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive():
            raise RuntimeError("the server exited before it was ready")
        try:
            response = httpx.get(f"{base}/health", timeout=2)
            if response.status_code == 200:
                return
            assert response.status_code == 503, response.text
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise TimeoutError(f"{base} not ready after {timeout} s")


class ServerProcess:
    """`oc-engine serve ARGS` in a subprocess; its output goes to `log` (a file)."""

    def __init__(self, args: list[str], log: Path, env: dict | None = None, launcher: tuple[str, ...] = ()):
        """launcher: a script to run in place of `python -m oc_engine.cli` (one that injects a fault)."""
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = log
        command = [sys.executable, *(launcher or ("-m", "oc_engine.cli")), "serve", "--port", str(self.port), *args]
        self._out = open(log, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(command, cwd=ROOT, stdout=self._out, stderr=subprocess.STDOUT,
                                     env={**os.environ, **(env or {})})

    def wait_ready(self, timeout: float = 300) -> "ServerProcess":
        try:
            wait_healthy(self.base, timeout, alive=lambda: self.proc.poll() is None)
        except Exception:
            self.stop()
            raise RuntimeError(f"server failed to start:\n{self.log.read_text()[-3000:]}") from None
        return self

    def terminate(self, timeout: float = 60) -> int:
        """SIGTERM; the exit status."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        finally:
            self._out.close()

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._out.close()


@contextlib.contextmanager
def thread_server(config, make_llm, timeout: float = 120):
    """build_app(config, make_llm) under uvicorn on a thread; yields its base URL."""
    import uvicorn

    from oc_engine.server import build_app

    port = free_port()
    app = build_app(config, make_llm)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, timeout, alive=thread.is_alive)
        yield base, app
    finally:
        server.should_exit = True
        thread.join(30)


def sse_events(response: httpx.Response) -> list:
    """The `data:` payloads of a server-sent event stream, parsed ([DONE] kept as the string)."""
    out = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            payload = line[len("data: "):]
            out.append(payload if payload == "[DONE]" else json.loads(payload))
    return out


def metric(base: str, name: str, key: str | None = None, **labels) -> float:
    """One sample's value from /metrics (0 when absent); `key`: the server's API key, if any."""
    from prometheus_client.parser import text_string_to_metric_families

    headers = {"authorization": f"Bearer {key}"} if key else {}
    response = httpx.get(f"{base}/metrics", timeout=10, headers=headers)
    response.raise_for_status()
    text = response.text
    total = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total
