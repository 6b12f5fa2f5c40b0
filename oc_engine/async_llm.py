"""`AsyncLLM`: an `LLM` driven by its own thread, for asyncio front ends (the server).

    engine = AsyncLLM(LLM())
    engine.start()
    seq = engine.llm.prepare_request(prompt, params)       # validates; raises OcEngineError
    async for events in engine.submit(seq):                # each step's events for this request
        ...
    engine.shutdown()

One thread owns the engine. Between steps it queues the new requests and carries out the
cancellations, then runs `LLM.step()` while anything is unfinished, and sleeps otherwise. A
step can block (when every running sequence waits for a verdict, or a check is overdue),
which is why no event loop may run one; a new request or a cancellation wakes such a step
(`LLM.wake`), so neither waits for a slow classifier. Each request's events reach its own asyncio queue on
the loop that submitted it, one list per step. Observers (metrics, an audit log) are called
on the engine thread with the request's `Sequence` and its events, before the caller sees
them. Leaving the iteration early (a client that disconnected) cancels the request at the
next step boundary: its slot is free for the step after.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import AsyncIterator

from oc_engine.engine.interface import Observer
from oc_engine.engine.sequence import Sequence
from oc_engine.errors import OcEngineError
from oc_engine.outputs import Event, Finished

log = logging.getLogger("oc_engine.async_llm")


class EngineDead(OcEngineError):
    """The engine thread stopped on an error: no request can be served any more."""


@dataclass(eq=False)
class RequestHandle:
    """One accepted request: its events go to `queue` on `loop` (the caller's event loop)."""

    seq: Sequence
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    done: bool = False
    task: object = None  # an engine's own handle on the work (the vLLM backend's driver future)


class EventStreams:
    """What every asyncio engine shares (this module's `AsyncLLM`, the vLLM backend's
    `VllmAsyncEngine`): reading a request's events, observing them, and handing them across
    threads. A subclass sets `observers` and implements `add` and `cancel`."""

    observers: list

    async def events(self, request: RequestHandle) -> AsyncIterator[list[Event]]:
        """The request's events, one list per step, the last holding `Finished`. Leaving early
        cancels the request."""
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, OcEngineError):
                    raise item
                if isinstance(item, BaseException):
                    raise EngineDead(f"the engine stopped: {item!r}") from item
                yield item
                if any(isinstance(e, Finished) for e in item):
                    return
        finally:
            if not request.done:
                self.cancel(request.seq.request_id)

    async def submit(self, seq: Sequence) -> AsyncIterator[list[Event]]:
        """`add`, then `events`."""
        request = self.add(seq)
        async for events in self.events(request):
            yield events

    def _observe(self, seq: Sequence, batch: list) -> None:
        for observe in self.observers:
            try:
                observe(seq, batch)
            except Exception:  # noqa: BLE001 - a broken observer must not stop every request
                log.exception("observer %r failed on request %s", observe, seq.request_id)

    @staticmethod
    def _put(request: RequestHandle, item) -> None:
        try:
            request.loop.call_soon_threadsafe(request.queue.put_nowait, item)
        except RuntimeError:
            pass  # its event loop is closed: nobody is listening any more


class AsyncLLM(EventStreams):
    def __init__(self, llm, observers: tuple[Observer, ...] = ()):
        self.llm = llm
        self.observers = list(observers)
        self.error: BaseException | None = None  # what stopped the engine thread, if anything did
        self._cv = threading.Condition()
        self._inbox: deque = deque()  # ("add", RequestHandle) or ("cancel", request id), for the engine thread
        self._requests: dict[str, RequestHandle] = {}  # accepted and not yet finished
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="oc-engine-loop", daemon=True)

    # -- the caller's side (the event loop) -------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    @property
    def outstanding(self) -> int:
        """Requests accepted and not finished: running, waiting for a slot, or draining."""
        return len(self._requests)

    @property
    def running(self) -> int:
        return self.llm.num_running

    @property
    def waiting(self) -> int:
        """Requests accepted that hold no cache slot yet."""
        with self._cv:
            queued = sum(1 for op, _ in self._inbox if op == "add")
        return queued + self.llm.num_waiting

    def add(self, seq: Sequence) -> RequestHandle:
        """Accept a prepared request now (call it on the event loop that will read its events);
        `events` then yields them. Raises `EngineDead` if the engine thread is not running."""
        request = RequestHandle(seq, asyncio.get_running_loop())
        with self._cv:
            if seq.request_id in self._requests:
                raise OcEngineError(f"request id {seq.request_id!r} is already in use")
            if not self.alive or self._stopping:
                raise EngineDead(f"the engine is not running{': ' + repr(self.error) if self.error else ''}")
            self._requests[seq.request_id] = request
            self._inbox.append(("add", request))
            self._cv.notify()
        self.llm.wake()  # a step blocked on verdicts lets it in now
        return request

    def cancel(self, request_id: str) -> None:
        """Cancel at the next step boundary (a no-op for a finished request)."""
        with self._cv:
            self._inbox.append(("cancel", request_id))
            self._cv.notify()
        self.llm.wake()

    def shutdown(self, timeout: float | None = None) -> None:
        """Finish the requests already accepted, then stop the thread (refusing new ones meanwhile)."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    # -- the engine thread ----------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                with self._cv:
                    while not self._inbox and not self.llm.has_unfinished() and not self._stopping:
                        self._cv.wait()
                    if self._stopping and not self._inbox and not self.llm.has_unfinished():
                        return
                    ops, self._inbox = list(self._inbox), deque()
                for op, item in ops:
                    if op == "cancel":
                        self.llm.cancel(item)
                        continue
                    try:
                        self.llm.add_request(item.seq)
                    except OcEngineError as exc:  # this request's fault (a reused id): only it fails
                        item.done = True
                        with self._cv:
                            self._requests.pop(item.seq.request_id, None)
                        self._put(item, exc)
                self._deliver(self.llm.step())
        except BaseException as exc:  # noqa: BLE001 - every waiting caller must hear of it
            self.error = exc
            with self._cv:
                requests, self._requests = list(self._requests.values()), {}
            for request in requests:
                request.done = True
                self._put(request, exc)

    def _deliver(self, events: list[Event]) -> None:
        by_request: dict[str, list] = {}
        for event in events:
            by_request.setdefault(event.request_id, []).append(event)
        for request_id, batch in by_request.items():
            request = self._requests.get(request_id)
            if request is None:
                continue
            self._observe(request.seq, batch)
            if any(isinstance(e, Finished) for e in batch):
                request.done = True
                with self._cv:
                    self._requests.pop(request_id, None)
            self._put(request, batch)
