"""`VllmAsyncEngine`: what `oc-engine serve --backend vllm` drives, with the interface of
`oc_engine.async_llm.AsyncLLM` (add, events, cancel, shutdown, and the gauges), so the HTTP
front end, its metrics and its audit log are the native server's, unchanged.

Each request runs as a task on the `VllmLLM`'s loop (`request_driver.drive`); its events are
passed to the observers there, then to the asyncio queue of the loop that added it (the
server's), one list at a time. Leaving `events` early cancels the task: vLLM is stopped and
nothing more of the answer is released.
"""

from __future__ import annotations

import asyncio
import threading

from oc_engine.async_llm import EngineDead, EventStreams, RequestHandle
from oc_engine.engine.sequence import Sequence
from oc_engine.errors import OcEngineError
from oc_engine.outputs import Finished


class VllmAsyncEngine(EventStreams):
    def __init__(self, llm, observers=()):
        self.llm = llm
        self.observers = list(observers)
        self.error: BaseException | None = None
        self._requests: dict[str, RequestHandle] = {}
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._stopping = False

    def start(self) -> None:
        """vLLM already runs (it started with the `VllmLLM`)."""

    @property
    def alive(self) -> bool:
        vllm = self.llm.vllm
        return self.error is None and vllm is not None and not vllm.errored

    @property
    def outstanding(self) -> int:
        return len(self._requests)

    @property
    def waiting(self) -> int:
        """Requests accepted that wait for a score-table row (vLLM runs at most the others)."""
        return self.llm.rows.waiting

    @property
    def running(self) -> int:
        return max(0, self.outstanding - self.waiting)

    def add(self, seq: Sequence) -> RequestHandle:
        """Accept a prepared request (on the event loop that will read its events)."""
        request = RequestHandle(seq, asyncio.get_running_loop())
        with self._lock:
            if seq.request_id in self._requests:
                raise OcEngineError(f"request id {seq.request_id!r} is already in use")
            if not self.alive or self._stopping:
                raise EngineDead(f"the engine is not running{': ' + repr(self.error) if self.error else ''}")
            self._requests[seq.request_id] = request
        request.task = asyncio.run_coroutine_threadsafe(self.llm.run_request(seq, self._emitter(request)),
                                                        self.llm.loop)
        request.task.add_done_callback(lambda future: self._ended(request, future))
        return request

    def cancel(self, request_id: str) -> None:
        request = self._requests.get(request_id)
        if request is not None and request.task is not None:
            request.task.cancel()

    def shutdown(self, timeout: float | None = None) -> None:
        """Refuse new requests and wait for the accepted ones to finish (vLLM itself stops with
        `VllmLLM.close`)."""
        with self._idle:
            self._stopping = True
            self._idle.wait_for(lambda: not self._requests, timeout)

    # -- on the backend loop ----------------------------------------------------------------
    def _emitter(self, request: RequestHandle):
        def emit(seq: Sequence, events: list) -> None:
            self._observe(seq, events)
            if any(isinstance(e, Finished) for e in events):
                request.done = True
            self._put(request, list(events))
        return emit

    def _ended(self, request: RequestHandle, future) -> None:
        error = None
        if not future.cancelled() and future.exception() is not None:
            exc = future.exception()
            vllm = self.llm.vllm
            if vllm is not None and vllm.errored:
                self.error = exc
            error = EngineDead(f"vLLM failed on this request: {type(exc).__name__}: {exc}")
        with self._idle:
            self._requests.pop(request.seq.request_id, None)
            self._idle.notify_all()
        if error is not None and not request.done:
            request.done = True
            self._put(request, error)
