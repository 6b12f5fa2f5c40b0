"""The classifier's queued checks, run together as one batch: by a worker thread, or inline.

Under load (many sequences decoding, each pausing or ending with a final check) checks arrive
faster than one-at-a-time calls can answer on a CPU shared with decoding, and a check that
waits in the queue past its deadline fails closed. The worker takes every check queued when it
becomes free (up to `max_batch`), pads them to one length and runs them in one call: a batch of
sixteen costs far less than sixteen calls. Padding does not change a check's answer beyond
float rounding (the attention mask hides it).

Inline (`inline=True`), there is no thread: checks wait in the queue until the decode loop
calls `drain()` between steps, which runs them all as one batch on the loop's own thread. On a
CPU that decoding keeps busy, a worker beside it only gets the time the decode threads leave
(little, under a full batch) and a starved check stalls every sequence when decoding has to
yield to it; inline, a check costs exactly its compute, once per step at most.

Each item is a dict of unpadded token-id lists (`input_ids`, `attention_mask`, maybe
`token_type_ids`); `run(batch: dict[str, np.ndarray [B, T]], urgent) -> [B, labels]` logits.
"""

from __future__ import annotations

import concurrent.futures as cf
import queue
import threading
from typing import Callable

import numpy as np

_STOP = object()


class CheckBatcher:
    def __init__(self, run: Callable[[dict, bool], np.ndarray], *, pad_id: int, max_batch: int = 32,
                 initializer: Callable[[], None] | None = None, name: str = "oc-classifier", inline: bool = False):
        self.run, self.pad_id, self.max_batch, self.initializer = run, pad_id, max_batch, initializer
        self.inline = inline
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._started = False
        self._lock = threading.Lock()
        self.batch_sizes: list[int] = []  # for benchmarks and tests

    def submit(self, item: dict, urgent: bool = False) -> cf.Future:
        """A future of this item's logits row [labels]."""
        future: cf.Future = cf.Future()
        with self._lock:
            if not self._started and not self.inline:
                self._thread.start()
                self._started = True
        self._queue.put((item, urgent, future))
        return future

    def drain(self) -> None:
        """Inline: run every queued check now, in batches of `max_batch` (the caller's thread;
        the decode loop calls it between steps). A no-op for a worker-thread batcher."""
        if not self.inline:
            return
        while True:
            jobs: list = []
            self._fill(jobs)  # inline, `close` puts no stop marker
            if not jobs:
                return
            self._run(jobs, urgent=True)  # decoding waits meanwhile: use every core

    def close(self) -> None:
        """Stop the worker; checks still queued are cancelled."""
        if self.inline:
            self._cancel_rest()
            return
        self._queue.put(_STOP)

    # -- the worker -----------------------------------------------------------------------
    def _loop(self) -> None:
        if self.initializer is not None:
            self.initializer()
        while True:
            first = self._queue.get()
            if first is _STOP:
                return self._cancel_rest()
            jobs = [first]
            stop = self._fill(jobs)
            self._run(jobs)
            if stop:
                return self._cancel_rest()

    def _fill(self, jobs: list) -> bool:
        """Add queued checks to `jobs`, up to `max_batch`, without waiting; True if the stop
        marker came."""
        while len(jobs) < self.max_batch:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return False
            if job is _STOP:
                return True
            jobs.append(job)
        return False

    def _run(self, jobs: list, urgent: bool = False) -> None:
        jobs = [job for job in jobs if job[2].set_running_or_notify_cancel()]  # drop cancelled checks
        if not jobs:
            return
        self.batch_sizes.append(len(jobs))
        try:
            logits = self.run(pad([item for item, _, _ in jobs], self.pad_id), urgent or any(u for _, u, _ in jobs))
        except BaseException as exc:  # noqa: BLE001 - every check of the batch fails (closed) with it
            for _, _, future in jobs:
                future.set_exception(exc)
            return
        for row, (_, _, future) in zip(logits, jobs):
            future.set_result(row)

    def _cancel_rest(self) -> None:
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                job[2].cancel()


def pad(items: list[dict], pad_id: int) -> dict:
    """Right-pad each field to the longest item: input ids with `pad_id`, the rest with 0."""
    length = max(len(item["input_ids"]) for item in items)
    out = {}
    for key in items[0]:
        fill = pad_id if key == "input_ids" else 0
        out[key] = np.array([list(item[key]) + [fill] * (length - len(item[key])) for item in items], dtype=np.int64)
    return out
