"""The model side of the engine: a static cache of fixed slots and the compiled decode step.

The step runs over the slots at once (all, or a bucket of the first ones: below); per-slot
state lives in device tensors that keep their shape and address (tokens, positions, an
`advance` mask, random keys, sampling parameters, the probe's EMA), so a request joining
(prefilled eagerly into a free slot), leaving, or waiting for a verdict changes values, never
shapes: nothing recompiles and no new CUDA graph is captured. A slot that is free, finished
or waiting has `advance` 0: it recomputes its last position (same token, same cache entry) and
its outputs are ignored. Two variants of the step exist, compiled on first use: greedy only,
and per-slot sampling (any running request samples).

Batch buckets: the step runs over the first `bucket` slots, the smallest bucket that holds
every slot that advances (the scheduler hands out the lowest free slot first). Each bucket is
a graph of its own with fixed shapes, compiled by `compile_buckets` at warm-up; until then only
the full batch runs, so no request ever waits for a compile it did not ask for. Here, in a
16-slot engine, one row took 9.4 ms a step and sixteen 30: a lone request decodes about as fast
as in a one-slot engine (0.97-0.98x measured).

In a long cache (over `SPAN_MIN_CACHE` positions, with the fused runner), attention reads only
the cache's first `span` positions: the live slots' furthest position + 1, rounded up to
`SPAN_BUCKET` (the host counts positions, so this needs no sync). The span reaches the step as
the length of a marker tensor whose size is marked unbacked, so one compiled graph serves
every span: a short answer in a 2048-token cache costs about what it would in a short cache.
A short cache keeps the fixed-length attention, which is faster at its own length. Compiled
span attention needs torch >= 2.12: torch 2.11's inductor (the GPU image's) cannot slice the
written cache by an unbacked size, so there a long cache attends over all of it.
"""

from __future__ import annotations

import time
from typing import Callable, Sequence as Seq

import torch

from oc_engine.engine import accel
from oc_engine.engine.kv_cache import StaticKVCache
from oc_engine.engine.runners import build_runner
from oc_engine.engine.sampling import RowSampling, SamplingConfig, sample_rows
from oc_engine.errors import OcEngineError
from oc_engine.guard.probe import Probe
from oc_engine.guard.probe_runtime import ProbeRuntime
from oc_engine.models.loading import LoadedModel

SPAN_BUCKET = 128  # attention spans are multiples of this (or the whole cache)
SPAN_MIN_CACHE = 512  # bound attention by the span only in caches longer than this
SPAN_COMPILES = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 12)


class ModelRunner:
    """tap: which entries of Hugging Face's `output_hidden_states` the step returns (an int or
    several; 0 = embeddings, -1 = after the final norm). A probe sets them to its layers.
    output_lag: steps the host reads behind the device (default: 1 on CUDA, 0 on CPU)."""

    def __init__(self, loaded: LoadedModel, *, num_slots: int, max_model_len: int, compile: bool = True,
                 probe: Probe | None = None, tap: int | Seq[int] | None = None, prefer_fused: bool = True,
                 output_lag: int | None = None, buckets: Seq[int] | None = None):
        self.model = loaded.model
        self.device, self.dtype = loaded.device, loaded.dtype
        self.runner = build_runner(self.model, prefer_fused=prefer_fused)
        self.num_layers = self.runner.num_layers
        self.compile = compile
        self.output_lag = accel.default_output_lag(self.device) if output_lag is None else output_lag
        if probe is not None:
            probe.check_model(self.model)
            tap = probe.config.layers
        self.taps = normalize_taps(tap, self.num_layers)
        self.num_slots, self.max_model_len = num_slots, max_model_len
        self.buckets = step_buckets(buckets, num_slots)
        self.vocab = int(self.model.get_output_embeddings().out_features)
        # + output_lag: with a lagged read, a slot may run that many steps past its last token
        # before the host sees it finish; those writes must stay inside the cache.
        self.cache = StaticKVCache(num_slots, max_model_len + self.output_lag, self.device, self.dtype)
        self.span_attention = self._wants_span()
        slots, device = num_slots, self.device
        self.tokens = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(slots, 1, dtype=torch.long, device=device)
        self.advance = torch.zeros(slots, 1, dtype=torch.long, device=device)  # 1: the slot decodes
        self.keys = torch.zeros(slots, dtype=torch.long, device=device)
        self.sampling = RowSampling.filled(slots, device, self.vocab)
        self.probe = ProbeRuntime(probe, slots, device) if probe is not None else None
        if self.probe is not None:
            self.probe.active.fill_(False)
        self.reader = accel.StepReader(device, self.output_lag)
        # Host mirrors, so the span needs no device read: each live slot's next write position
        # and whether it advances.
        self._next_pos: dict[int, int] = {}  # live slot -> position its next step writes
        self._advancing: set[int] = set()
        self._span_refs: dict[int, torch.Tensor] = {}  # span -> marker tensor of that length
        self._steps: dict[tuple[bool, int], Callable] = {}  # (sampled?, bucket) -> step
        self._compiled: set[tuple[bool, int]] = set()  # steps whose first (compiling) call has run
        self.compile_s = 0.0  # wall time spent compiling steps (their first calls)
        self.compile_intervals: list[tuple[float, float]] = []

    def resize(self, max_model_len: int) -> None:
        """Another cache length, before anything ran (attention reads the whole cache every step,
        so a cache sized to the job decodes faster)."""
        if self._compiled or self.cache.keys:
            raise OcEngineError("the cache can be resized only before the first request")
        self.max_model_len = max_model_len
        self.cache = StaticKVCache(self.num_slots, max_model_len + self.output_lag, self.device, self.dtype)
        self.span_attention = self._wants_span()
        self._span_refs.clear()

    # -- slots --------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, slot: int, prompt_ids: list[int], sampling: SamplingConfig, key: int, start: int = 0):
        """Run a prompt into `slot` and sample its first token; `start`: its first tokens are in
        the slot's cache already (`prefill_part`).

        Returns (token, score, ema, flags, tapped [L, H] | None); score/ema/flags are None
        without a probe. The slot then decodes (`advance` 1) until `set_decoding` stops it."""
        logits, tapped = self._run_prompt(slot, prompt_ids, start, len(prompt_ids))
        return self._start_decoding(slot, len(prompt_ids), sampling, key, logits, tapped)

    @torch.inference_mode()
    def prefill_together(self, prompts: list[tuple[int, list[int], SamplingConfig, int]]) -> list[tuple]:
        """Whole prompts, each (slot, prompt_ids, sampling, key), into their slots in one forward
        pass: right-padded to the longest, each row's logits and taps read at its own last
        token. Returns what `prefill` returns, per prompt, in order.

        Why: a prefill here costs about 20 ms whatever its length, plus 0.37 ms a token, so
        prompts prefilled one after another paid that once each (8 prompts of about 40 tokens:
        357 ms one by one, 191 ms together). A row's padding writes K/V past its prompt, at
        positions its own decode steps write before any query may see them (a query at p sees
        positions up to p)."""
        if len(prompts) == 1:
            return [self.prefill(*prompts[0])]
        width = max(len(ids) for _, ids, _, _ in prompts)
        ids = torch.zeros(len(prompts), width, dtype=torch.long)
        for row, (_, prompt_ids, _, _) in enumerate(prompts):
            ids[row, :len(prompt_ids)] = torch.tensor(prompt_ids)
        pos = torch.arange(width, device=self.device)[None].expand(len(prompts), width)
        slots = torch.tensor([slot for slot, _, _, _ in prompts], device=self.device)
        last = torch.tensor([len(prompt_ids) - 1 for _, prompt_ids, _, _ in prompts], device=self.device)
        span = width if self.runner.supports_span else None
        logits, tapped = self.runner(ids.to(self.device), pos, self.cache.rows_at(slots), self.taps, span, last)
        return [self._start_decoding(slot, len(prompt_ids), sampling, key, logits[row:row + 1],
                                     None if tapped is None else tapped[:, row:row + 1])
                for row, (slot, prompt_ids, sampling, key) in enumerate(prompts)]

    def _start_decoding(self, slot: int, length: int, sampling: SamplingConfig, key: int, logits: torch.Tensor,
                        tapped: torch.Tensor | None):
        """After a prompt of `length` tokens: its first token from logits [1, V], the probe's
        first score from tapped [L, 1, H]; the slot then decodes."""
        self._next_pos[slot] = length
        self.keys[slot] = key
        self.sampling.set(slot, sampling, self.vocab)
        # Greedy needs no sort of the vocabulary (2.6 ms of a 30 ms prefill here); same token.
        first = logits.argmax(dim=-1) if sampling.greedy else sample_rows(
            logits, self.sampling.rows(slot, slot + 1), self.keys[slot:slot + 1],
            torch.tensor([length - 1], device=self.device))
        self.tokens[slot, 0] = first[0]
        self.pos[slot, 0] = length
        self.set_decoding(slot, True)
        score = ema = flags = None
        if self.probe is not None:
            self.probe.reset(slot)
            s, e, f = self.probe.score_row(tapped, slot)
            score, ema, flags = float(s[0]), float(e[0]), int(f[0])
        return int(first[0]), score, ema, flags, None if tapped is None else tapped[:, 0]

    @torch.inference_mode()
    def prefill_part(self, slot: int, prompt_ids: list[int], start: int, end: int) -> None:
        """Run prompt tokens [start, end) into `slot`'s cache (those before `start` are there),
        sampling nothing: one chunk of a long prompt, between decode steps. A step whose bucket
        holds this (non-advancing) slot writes its K/V at its position, which is set to `end`:
        the next chunk writes there first, so nothing prefilled is overwritten."""
        self._run_prompt(slot, prompt_ids, start, end)
        self.pos[slot, 0] = end

    def _run_prompt(self, slot: int, prompt_ids: list[int], start: int, end: int):
        """(logits [1, V], tapped [L, 1, H] | None) for prompt tokens [start, end)."""
        ids = torch.tensor([prompt_ids[start:end]], dtype=torch.long, device=self.device)
        pos = torch.arange(start, end, device=self.device)[None]
        span = end if self.runner.supports_span else None  # eager: any span, no graph
        return self.runner(ids, pos, self.cache.rows(slot, slot + 1), self.taps, span)

    def set_decoding(self, slot: int, decoding: bool) -> None:
        """A slot stops advancing (finished, freed, or waiting for a verdict) or resumes; a
        stopped slot keeps its EMA. The runner is the one owner of which slots advance: a call
        that changes nothing writes nothing to the device."""
        if (slot in self._advancing) == decoding:
            return
        self.advance[slot, 0] = int(decoding)
        (self._advancing.add if decoding else self._advancing.discard)(slot)
        if self.probe is not None:
            self.probe.active[slot] = decoding

    def release(self, slot: int) -> None:
        """The slot's sequence left: its positions no longer bound the attention span."""
        self.set_decoding(slot, False)
        self._next_pos.pop(slot, None)

    # -- the step -----------------------------------------------------------------------
    def launch(self, sampled: bool, keep_taps: bool = False):
        """Queue one decode step over the first slots (`bucket`); returns a handle for `read`
        (outputs [bucket] for the slots that advanced: token ids, and the probe's score, EMA and
        flags) and, with `keep_taps`, the tapped states [L, bucket, H]."""
        bucket = self.bucket(sampled)
        next_tokens, tapped, score, ema, flags = self._run_step(sampled, bucket)
        with torch.inference_mode():
            self.pos += self.advance
            for slot in self._advancing:
                if slot in self._next_pos:
                    self._next_pos[slot] += 1
            tokens = self.tokens[:bucket]
            tokens.copy_(torch.where(self.advance[:bucket].bool(), next_tokens[:, None], tokens))
            outputs = [next_tokens] + ([score, ema, flags] if self.probe is not None else [])
            handle = self.reader.stage(outputs)
            kept = tapped.clone() if keep_taps and tapped is not None else None
        return handle, kept

    def compile_buckets(self) -> None:
        """Compile the greedy and the sampled step of every bucket now (warm-up). Each runs once
        over the slots as they are and its outputs are dropped: a slot that does not advance
        recomputes its last position (the same K/V) and keeps its EMA, and nothing moves on."""
        for bucket in self.buckets:
            for sampled in (False, True):
                if self.compile and (sampled, bucket) not in self._compiled:
                    self._run_step(sampled, bucket)

    def bucket(self, sampled: bool) -> int:
        """The step's batch: the smallest bucket that holds every slot that advances and is
        compiled (the full one compiles on first use, the smaller ones in `compile_buckets`:
        a lone request never waits for a compile). The scheduler hands out the lowest free slot,
        so a lone request in an idle engine runs in bucket 1."""
        need = max(self._advancing, default=0) + 1
        return next(b for b in self.buckets if b >= need and (b == self.num_slots or not self.compile
                                                              or (sampled, b) in self._compiled))

    def _run_step(self, sampled: bool, bucket: int):
        start = time.perf_counter()  # before `_step`: making the compiled function imports inductor
        step = self._step(sampled, bucket)
        first_call = self.compile and (sampled, bucket) not in self._compiled
        rows = self.cache.first_rows(bucket)
        with torch.inference_mode():
            outputs = step(self.tokens, self.pos, rows, self.probe, self.keys, self.sampling, self._span_ref())
        if first_call:  # the first call of a compiled step traces and compiles it
            accel.synchronize(self.device)
            end = time.perf_counter()
            self._compiled.add((sampled, bucket))
            self.compile_s += end - start
            self.compile_intervals.append((start, end))
        return outputs

    def read(self, handle) -> list[list]:
        """The host's one wait per step (`output_lag` steps behind the device)."""
        return self.reader.read(handle)

    def decode_one_token(self, tokens: torch.Tensor, pos: torch.Tensor, cache_rows, probe: ProbeRuntime | None,
                         keys: torch.Tensor, sampling: RowSampling | None, span_ref: torch.Tensor | None = None):
        """tokens [S, 1], pos [S, 1], keys [S] (each slot's random stream), span_ref [span]
        (its length bounds attention; None: the whole cache) -> (next [S], tapped [L, S, H] |
        None, score, ema, flags [S] | None). sampling None: greedy.

        No host sync: sampling, the probe score and the EMA update all stay on the device."""
        span = None if span_ref is None else span_ref.shape[0]
        logits, tapped = self.runner(tokens, pos, cache_rows, self.taps, span)
        if sampling is None:
            next_tokens = logits.argmax(dim=-1)
        else:
            next_tokens = sample_rows(logits, sampling, keys, pos[:, 0])
        if probe is None:
            return next_tokens, tapped, None, None, None
        score, ema, flags = probe.score(tapped)
        return next_tokens, tapped, score, ema, flags

    def _step(self, sampled: bool, bucket: int) -> Callable:
        """The step over the first `bucket` slots. Every bucket is a graph of its own, compiled
        with fixed shapes (a dynamic batch made inductor's CPU code far slower); the full
        tensors go in and are sliced inside the graph, so on CUDA every input keeps its static
        address."""
        key = (sampled, bucket)
        if key not in self._steps:
            full = bucket == self.num_slots

            def step(tokens, pos, rows, probe, keys, sampling, span_ref, _sampled=sampled, _b=bucket, _full=full):
                if not _full:
                    tokens, pos, keys, sampling = tokens[:_b], pos[:_b], keys[:_b], sampling.rows(0, _b)
                return self.decode_one_token(tokens, pos, rows, probe, keys, sampling if _sampled else None, span_ref)
            name = f"decode_step_{'sampled' if sampled else 'greedy'}_{bucket}_{id(self):x}"
            self._steps[key] = accel.compile_step(step, self.device, name) if self.compile else step
        return self._steps[key]


    def _wants_span(self) -> bool:
        return (getattr(self.runner, "supports_span", False) and self.cache.max_len > SPAN_MIN_CACHE
                and (SPAN_COMPILES or not self.compile))

    def _span_ref(self) -> torch.Tensor | None:
        """A tensor whose length is this step's attention span: every live slot's write
        position + 1, rounded up to SPAN_BUCKET, at most the cache (its size unbacked: one
        graph for every span). None: attend over the whole cache."""
        if not self.span_attention:
            return None
        need = max(self._next_pos.values(), default=0) + 1
        span = min(-(-need // SPAN_BUCKET) * SPAN_BUCKET, self.cache.max_len)
        if span not in self._span_refs:
            ref = torch.empty(span, dtype=torch.int8, device=self.device)
            if self.compile:
                # Unbacked, not just dynamic: a backed size would be pinned to its first value
                # by the compiler's contiguity checks on the sliced cache.
                torch._dynamo.decorators.mark_unbacked(ref, 0)
            self._span_refs[span] = ref
        return self._span_refs[span]


def step_buckets(buckets: Seq[int] | None, num_slots: int) -> tuple[int, ...]:
    """The sorted batch buckets below `num_slots`, then `num_slots` (None: that one bucket)."""
    if any(b < 1 for b in buckets or ()):
        raise OcEngineError(f"batch buckets must be at least 1, got {tuple(buckets)}")
    return tuple(sorted({b for b in buckets or () if b < num_slots} | {num_slots}))


def normalize_taps(tap: int | Seq[int] | None, num_layers: int) -> tuple[int, ...]:
    if tap is None:
        return ()
    points = num_layers + 1
    taps = (tap,) if isinstance(tap, int) else tuple(tap)
    for t in taps:
        if not -points <= t < points:
            raise OcEngineError(f"tap layer {t} is out of range for a model with {num_layers} layers "
                                f"(hidden states 0..{num_layers}, or negative from the end)")
    return tuple(t % points for t in taps)
