"""One guarded request through vLLM: the caller's half of the guard.

`drive(backend, seq, emit)` runs on the backend's event loop. It submits the request to vLLM's
`AsyncLLM` with its score-table row, and then loops:

1. deliver the verdicts that arrived (`SequenceMonitor.poll`: a late one is a timeout);
2. take the tokens vLLM produced since the last turn, and give them to the guard one by one
   with the score, EMA and flags the worker wrote for each (a token whose entry is missing
   counts as a non-finite score: a pause). While the guard holds `max_held` tokens and waits
   for a verdict, the native engine stops decoding that sequence; vLLM cannot pause one
   request, so its tokens wait here instead, unseen, until the guard takes tokens again;
3. when the answer ends (EOS, a stop string, the length limit, or the guard), stop vLLM: the
   score table's stop flag (the logits processor forces EOS next step) and an abort;
4. wait for the next output or verdict, or for the pending check's deadline.

So the guard sees exactly the token/score sequence the native engine would give it, and
everything the user sees leaves as the monitor's events, through `emit`. Cancellation (the
client left) stops vLLM, drops the pending check and releases nothing more.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque

from oc_engine.engine.llm_engine import build_completion
from oc_engine.engine.sequence import FINISHED, RUNNING, Sequence
from oc_engine.outputs import Finished, TextReleased

MISSING = (math.nan, math.nan, 7)  # no entry for a token: non-finite, every flag set (a pause)
VLLM_FINISH = {"stop": "eos", "length": "length", "abort": "cancelled"}


async def drive(backend, seq: Sequence, emit) -> None:
    """Run `seq` to its end on vLLM; `emit(seq, events)` receives its events in order."""
    from vllm.inputs import TokensPrompt

    clock = time.perf_counter
    monitor = seq.guard
    seq.arrival = clock()
    row = await backend.rows.acquire()
    tag = backend.next_tag()
    vllm_id = f"{seq.request_id}-{tag}"
    wake = asyncio.Event()
    outputs: asyncio.Queue = asyncio.Queue()
    loop = asyncio.get_running_loop()
    hooked = None  # the check future whose arrival wakes this loop (kept: an id could be reused)
    pump = None
    stopped = False

    def send(events: list) -> None:
        if seq.first_text_at is None and any(isinstance(e, TextReleased) and e.text for e in events):
            seq.first_text_at = clock()
        if events:
            emit(seq, events)

    def guard_events() -> None:
        nonlocal hooked
        if monitor is None:
            return
        send(monitor.take_events())
        pending = monitor.pending
        if pending is not None and pending.future is not hooked:
            hooked = pending.future
            pending.future.add_done_callback(lambda _f: loop.call_soon_threadsafe(wake.set))

    async def pump_outputs(params) -> None:
        try:
            async for output in backend.vllm.generate(TokensPrompt(prompt_token_ids=seq.prompt_ids), params, vllm_id):
                outputs.put_nowait(output)
                wake.set()
        except BaseException as exc:  # noqa: BLE001 - the driver re-raises it on its side
            outputs.put_nowait(exc)
        finally:
            outputs.put_nowait(None)
            wake.set()

    async def stop_vllm() -> None:
        nonlocal stopped
        if not stopped:
            stopped = True
            _stop_row(backend, row, tag)
            await backend.vllm.abort(vllm_id)

    try:
        if backend.table is not None:  # None: unguarded, no probe
            backend.table.claim(row, tag)
        seq.status, seq.prefill_start = RUNNING, clock()
        if monitor is not None:
            monitor.start()  # the input check runs beside the prefill
            guard_events()
        pump = asyncio.create_task(pump_outputs(backend.vllm_params(seq, row, tag)))
        arrived: deque[int] = deque()  # tokens from vLLM the guard has not taken yet
        vllm_finish = None
        vllm_done = False
        while True:
            if monitor is not None:
                monitor.poll()
                guard_events()
            while not outputs.empty():
                item = outputs.get_nowait()
                if item is None:
                    vllm_done = True
                elif isinstance(item, BaseException):
                    raise item
                else:
                    completion = item.outputs[0]
                    arrived.extend(completion.token_ids)  # DELTA outputs: only the new tokens
                    vllm_finish = completion.finish_reason or vllm_finish
            while arrived and not seq.decoding_done and (monitor is None or not monitor.must_wait):
                send(_accept(backend, seq, arrived.popleft(), row, tag, clock))
                guard_events()
            if not seq.end_if_guard_stopped():
                if vllm_done and not arrived:
                    seq.finish_reason = VLLM_FINISH.get(vllm_finish, "length")
                    if monitor is not None:
                        monitor.on_finish()
                        guard_events()
            if seq.decoding_done:
                if seq.decode_end is None:
                    seq.decode_end = clock()
                await stop_vllm()
                if monitor is None or monitor.pending is None:
                    break
            await _wait(wake, monitor, clock)
        _finish(seq, monitor, send, clock)
    except asyncio.CancelledError:
        if monitor is not None:
            monitor.cancel()
        if not seq.decoding_done:
            seq.finish_reason = "cancelled"
        _finish(seq, monitor, send, clock)
        raise
    finally:
        if pump is not None:
            if not stopped:
                stopped = True
                _stop_row(backend, row, tag)
                if backend.vllm is not None:  # not awaited on the cancelled path: vLLM frees the slot
                    loop.create_task(backend.vllm.abort(vllm_id))
            pump.cancel()
        backend.rows.release(row)


def _accept(backend, seq: Sequence, token: int, row: int, tag: int, clock) -> list:
    """One token that came back from vLLM, with its score from the table: `Sequence.accept`,
    as the native engine does; returns its events."""
    index = len(seq.token_ids)
    score, ema, flags = (backend.table.read(row, tag, index) or MISSING) if backend.probe is not None \
        else (None, None, 0)
    return seq.accept(token, token in backend.eos_ids, score, ema, flags, clock())


async def _wait(wake: asyncio.Event, monitor, clock) -> None:
    """Until the next output or verdict, or the pending check's deadline."""
    timeout = None
    pending = monitor.pending if monitor is not None else None
    if pending is not None:
        timeout = max(0.0, pending.submitted + monitor.config.deadline_s - clock()) + 1e-3
    try:
        await asyncio.wait_for(wake.wait(), timeout)
    except asyncio.TimeoutError:
        pass
    wake.clear()


def _finish(seq: Sequence, monitor, send, clock) -> None:
    if seq.status == FINISHED:
        return
    if monitor is not None:
        monitor.finish()
        send(monitor.take_events())
    seq.status, seq.finished_at = FINISHED, clock()
    seq.completion = build_completion(seq)
    send([Finished(seq.request_id, seq.completion)])


def _stop_row(backend, row: int, tag: int) -> None:
    if backend.table is not None:
        backend.table.stop(row, tag)
