"""The engine loop: admit waiting requests into free slots, decode one step, hand out tokens.

One `step()`:
1. run the checks an inline classifier queued (`run_checks`), then deliver the verdicts that
   arrived (never blocking otherwise); a sequence its guard stopped leaves at once;
2. admit waiting requests into free slots (first come, first served) and prefill them, at most
   `prefill_chunk` prompt tokens per step (a long prompt over several steps, so the running
   requests keep decoding; prompts that fit together, in one forward pass); a step in which a
   prefill completes, sampling its first token, ends there, so first tokens are delivered
   before the next decode step (the first one compiles);
3. run the compiled step over all slots, with the slots whose guard holds `max_held` tokens
   frozen, and read the new tokens (on CUDA one step behind the device, see `accel.StepReader`);
4. a sequence that ends (EOS, stop string, length, guard, cancel) frees its slot at once; one
   whose guard still awaits a verdict (a final check) drains without a slot.
If every running sequence waits for a verdict, the step blocks until one arrives, its deadline
passes or `wake()` is called; so does a step while a check has waited past a quarter of its
deadline (a CPU under a full batch leaves a worker-thread classifier no time otherwise, and a
late verdict fails closed). Events (released text, pauses, verdicts, refusals, the finish) go
to each sequence.
"""

from __future__ import annotations

import concurrent.futures as cf
import time
from collections import deque
from typing import Callable

from oc_engine.engine.model_runner import ModelRunner
from oc_engine.engine.scheduler import Scheduler
from oc_engine.engine.sequence import DRAINING, FINISHED, RUNNING, WAITING, Sequence
from oc_engine.guard.monitor import wait_for_verdicts
from oc_engine.outputs import Completion, Finished, TextReleased, Timings


class LLMEngine:
    def __init__(self, runner: ModelRunner, eos_ids: set[int], clock: Callable[[], float] = time.perf_counter,
                 run_checks: Callable[[], None] | None = None, prefill_chunk: int | None = None):
        self.runner, self.eos_ids, self.clock = runner, eos_ids, clock
        self.prefill_chunk = prefill_chunk  # prompt tokens prefilled per step at most (None: any)
        self.prefilling: deque[Sequence] = deque()  # admitted, prompt not all in the cache yet
        self.run_checks = run_checks or (lambda: None)  # an inline classifier's queued checks
        self.scheduler = Scheduler(runner.num_slots)
        self.requests: dict[str, Sequence] = {}  # every unfinished request
        self.draining: list[Sequence] = []
        self.inflight: deque = deque()  # launched steps whose outputs the host has not read yet
        self._wake = cf.Future()  # done: a step blocked on verdicts returns early (see `wake`)
        self._emitted = 0  # events emitted so far: a step that made some must not block before returning them

    # -- requests -----------------------------------------------------------------------
    def add(self, seq: Sequence) -> None:
        seq.arrival = self.clock()
        self.requests[seq.request_id] = seq
        self.scheduler.add(seq)

    def cancel(self, request_id: str) -> bool:
        """Stop a request now; nothing it holds is released. False if it is unknown or finished."""
        seq = self.requests.get(request_id)
        if seq is None:
            return False
        if seq.status == RUNNING:
            self._flush()  # tokens already decoded are the sequence's own; it may even finish now
            if seq.status == FINISHED:
                return False
        if seq.status == WAITING:
            self.scheduler.remove_waiting(seq)
        if seq.guard is not None:
            seq.guard.cancel()
        if not seq.decoding_done:
            seq.finish_reason = "cancelled"
        if seq.status == RUNNING:
            self._leave_slot(seq)
        self._finalize(seq)
        return True

    def has_unfinished(self) -> bool:
        return bool(self.requests)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def wake(self) -> None:
        """From any thread: make a step that blocks on verdicts return now (a front end has a
        request to add or cancel). A wake that comes before the block is kept for it."""
        try:
            self._wake.set_result(None)
        except cf.InvalidStateError:
            pass  # already woken

    # -- the loop -----------------------------------------------------------------------
    def step(self) -> None:
        self.run_checks()
        emitted = self._emitted
        self._poll_guards()
        # A step blocks only if it has nothing to hand back: events made before a block would
        # reach their callers only after it (a finished answer held for a stranger's deadline).
        # Nothing below emits before a block: admitting and decoding never reach one.
        idle = self._emitted == emitted
        overdue = [s.guard for s in (*self.scheduler.running.values(), *self.draining)
                   if s.guard is not None and s.guard.overdue()]
        if overdue and idle:  # a starved check: decoding yields the machine until a verdict arrives
            self._wait(overdue)
            self._poll_guards()
            return
        if self.scheduler.waiting and self.scheduler.free_slots:
            self._flush()  # a freed slot may still have a lagged step in flight
            for seq in self.scheduler.admit():
                self._admit(seq)
        if self.prefilling and self._prefill():
            return  # first tokens reach their callers before the next decode step (which may compile)
        decoding = []
        for slot, seq in self.scheduler.running.items():
            go = not seq.prefilling and (seq.guard is None or not seq.guard.must_wait)
            self.runner.set_decoding(slot, go)
            if go:
                decoding.append(seq)
        if decoding:
            sampled = any(not s.params.greedy for s in decoding)
            handle, taps = self.runner.launch(sampled, keep_taps=any(s.collect_taps or s.reads_states
                                                                     for s in decoding))
            self.inflight.append((handle, {s.slot: s for s in decoding}, taps))
            if len(self.inflight) > self.runner.output_lag:
                self._read_oldest()
        elif self.inflight:
            self._read_oldest()
        else:
            waiting = [s.guard for s in (*self.scheduler.running.values(), *self.draining) if s.guard is not None]
            if waiting and idle and not self.prefilling:  # a prompt still going in is work to do
                self._wait(waiting)  # every live sequence waits for a verdict
                self._poll_guards()

    # -- internals ----------------------------------------------------------------------
    def _wait(self, guards: list) -> None:
        self.run_checks()  # an inline classifier answers only when asked
        wait_for_verdicts(guards, wake=self._wake)
        if self._wake.done():
            self._wake = cf.Future()  # consumed: the caller sees its new work before the next block

    def _admit(self, seq: Sequence) -> None:
        seq.prefill_start = self.clock()
        if seq.guard is not None:
            seq.guard.start()  # the input check runs beside the prefill
        self.prefilling.append(seq)

    def _prefill(self) -> bool:
        """Prefill admitted prompts in order, `prefill_chunk` tokens at most; a prompt whose
        last tokens go in samples its first token. Returns whether one did. Whole prompts that
        fit the budget together, padding included, go in one forward pass (`prefill_together`)."""
        limit = self.prefill_chunk or float("inf")
        budget, completed = limit, False
        while self.prefilling and budget > 0:
            seq = self.prefilling[0]
            start, total = seq.prefilled, len(seq.prompt_ids)
            if total - start > budget:
                seq.prefilled = start + int(budget)
                self.runner.prefill_part(seq.slot, seq.prompt_ids, start, seq.prefilled)
                return completed
            if start > 0:  # the last chunk of a long prompt: alone, at its positions
                group = [self.prefilling.popleft()]
                results = [self.runner.prefill(seq.slot, seq.prompt_ids, seq.params.sampling, seq.key, start=start)]
            else:
                group = self._whole_prompts(budget, limit)
                results = self.runner.prefill_together([(s.slot, s.prompt_ids, s.params.sampling, s.key)
                                                        for s in group])
            budget -= sum(len(s.prompt_ids) - s.prefilled for s in group)
            for seq, result in zip(group, results):
                seq.prefilled = len(seq.prompt_ids)
                self._accept(seq, *result)
            completed = True
        return completed

    def _whole_prompts(self, budget: float, limit: float) -> list[Sequence]:
        """The waiting prompts from the front, none begun, whose tokens fit `budget` and whose
        padded batch fits `limit` (at least the first: it fits the budget)."""
        group = [self.prefilling.popleft()]
        width = used = len(group[0].prompt_ids)
        while self.prefilling and self.prefilling[0].prefilled == 0:
            length = len(self.prefilling[0].prompt_ids)
            if used + length > budget or (len(group) + 1) * max(width, length) > limit:
                break
            group.append(self.prefilling.popleft())
            width, used = max(width, length), used + length
        return group

    def _read_oldest(self) -> None:
        handle, slots, taps = self.inflight.popleft()
        host = self.runner.read(handle)
        probed = len(host) > 1
        taps = None if taps is None else taps.float().cpu()  # one copy per step, not one per sequence
        for slot, seq in slots.items():
            if seq.status != RUNNING or seq.decoding_done:
                continue  # it ended (or was cancelled) after this step was launched
            score, ema, flags = (host[1][slot], host[2][slot], host[3][slot]) if probed else (None, None, None)
            self._accept(seq, host[0][slot], score, ema, flags, None if taps is None else taps[:, slot])

    def _flush(self) -> None:
        while self.inflight:
            self._read_oldest()

    def _accept(self, seq: Sequence, token: int, score, ema, flags, tapped) -> None:
        """tapped: [L, H], the states that produced `token` (kept when a sequence asks for them)."""
        events = seq.accept(token, token in self.eos_ids, score, ema, flags, self.clock(),
                            tapped if seq.reads_states else None)
        if seq.collect_taps and tapped is not None:
            seq.taps.append((tapped[0] if tapped.shape[0] == 1 else tapped).float().cpu().clone())
        self._emit(seq, events)
        self._settle(seq)

    def _poll_guards(self) -> None:
        for seq in (*self.scheduler.running.values(), *self.draining):
            if seq.guard is None:
                continue
            seq.guard.poll()
            self._emit(seq, seq.guard.take_events())
            seq.end_if_guard_stopped()
            self._settle(seq)

    def _settle(self, seq: Sequence) -> None:
        """After a token or a verdict, the one place a request moves on (as nano-vllm's
        `postprocess`): a running one whose decoding ended leaves its slot (and drains while a
        verdict is pending); a draining one whose verdict came finishes."""
        if seq.status == RUNNING and seq.decoding_done:
            self._end_decoding(seq)
        elif seq.status == DRAINING and seq.guard.pending is None:
            self._finalize(seq)

    def _end_decoding(self, seq: Sequence) -> None:
        seq.decode_end = self.clock()
        if seq.status == RUNNING:
            self._leave_slot(seq)
        if seq.guard is not None and seq.guard.pending is not None:
            seq.status = DRAINING
            self.draining.append(seq)
        else:
            self._finalize(seq)

    def _leave_slot(self, seq: Sequence) -> None:
        if seq.prefilling:  # cancelled, or blocked by its input check, before its first token
            self.prefilling.remove(seq)
        self.runner.release(seq.slot)
        self.scheduler.free(seq)

    def _finalize(self, seq: Sequence) -> None:
        if seq.status == FINISHED:
            return
        if seq.guard is not None:
            seq.guard.finish()
            self._emit(seq, seq.guard.take_events())
        seq.status, seq.finished_at = FINISHED, self.clock()
        if seq in self.draining:
            self.draining.remove(seq)
        self.requests.pop(seq.request_id, None)
        seq.completion = build_completion(seq, self.runner.compile_intervals)
        self._emit(seq, [Finished(seq.request_id, seq.completion)])

    def _emit(self, seq: Sequence, events: list) -> None:
        self._emitted += len(events)
        if seq.first_text_at is None and any(isinstance(e, TextReleased) and e.text for e in events):
            seq.first_text_at = self.clock()  # the user's time to first token: the guard may hold the first ones
        seq.emit(events)


def build_completion(seq: Sequence, compile_intervals=()) -> Completion:
    """A finished sequence's `Completion`: the released text and tokens, the guard's report, and
    its timings (decode rate without the time spent compiling, `compile_intervals`)."""
    guard = seq.guard
    report = guard.report() if guard is not None else None
    released = seq.token_ids[:report.released_tokens] if report is not None else seq.token_ids
    ms = lambda t: round(((t if t is not None else seq.finished_at) - seq.arrival) * 1000, 3)  # noqa: E731
    start = seq.prefill_start if seq.prefill_start is not None else seq.finished_at
    rate = None
    if len(seq.token_ids) > 1 and seq.first_token_at is not None:
        end = seq.decode_end if seq.decode_end is not None else seq.finished_at
        compiling = sum(max(0.0, min(b, end) - max(a, seq.first_token_at))
                        for a, b in compile_intervals)
        rate = round((len(seq.token_ids) - 1) / max(end - seq.first_token_at - compiling, 1e-9), 3)
    timings = Timings(queued_ms=ms(start), prefill_ms=round(((seq.first_token_at or start) - start) * 1000, 3),
                      ttft_ms=ms(seq.first_token_at), decode_tokens_per_s=rate, total_ms=ms(seq.finished_at),
                      first_text_ms=ms(seq.first_text_at) if seq.first_text_at is not None else None)
    return Completion(request_id=seq.request_id, prompt=seq.prompt, prompt_token_ids=tuple(seq.prompt_ids),
                      text=guard.text if guard is not None else seq.text, token_ids=tuple(released),
                      finish_reason=seq.finish_reason or "cancelled",
                      refusal=guard.refusal if guard is not None else None, guard=report, timings=timings,
                      generated_tokens=len(seq.token_ids))
