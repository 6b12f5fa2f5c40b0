"""The decode loop: prefill each prompt into a static cache, then one compiled step per token.

Read top-down: `GenerationConfig` (validated), `SequenceResult`, then `Engine.generate`:
1. prefill every prompt on its own cache row (no padding; a prompt's result in a batch
   equals its result alone), sampling its first token;
2. step all rows together with `decode_one_token` (compiled once per sampling config and
   cache shape; positions are device tensors updated in place, so nothing recompiles). With
   a probe, the step also scores the tapped states and updates the EMA on the device;
3. the Python loop reads the new tokens and the probe's score, EMA and flags together
   (`accel.StepReader`: on CUDA through pinned buffers one step behind the device, so the
   next step is queued before the host waits; on CPU directly), streams text, lets a monitor
   (the guard) react, and retires finished sequences. Rows that finish or wait for a verdict
   are frozen (their position stops advancing) instead of leaving the batch.
"""

from __future__ import annotations

import random
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence

import torch

from oc_engine.engine import accel
from oc_engine.engine.kv_cache import StaticKVCache
from oc_engine.engine.loading import LoadedModel
from oc_engine.engine.probe import Probe
from oc_engine.engine.probe_runtime import ProbeRuntime
from oc_engine.engine.runners import build_runner
from oc_engine.engine.sampling import SamplingConfig, sample, sequence_keys
from oc_engine.engine.text_stream import TextStream
from oc_engine.errors import OcEngineError

CACHE_BUCKET = 128  # cache lengths are rounded up to this, so nearby requests reuse one compiled step


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 256
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    seed: int | None = None
    stop_strings: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise OcEngineError(f"max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if any(not isinstance(s, str) or not s for s in self.stop_strings):
            raise OcEngineError("a stop string must be non-empty text")


@dataclass
class SequenceResult:
    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # the model's text (what a guard releases may be less)
    finish_reason: str | None = None  # "eos", "stop" (a stop string), "length" or "guard"
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0  # from the start of generate() to this sequence's first token
    decode_tokens_per_s: float | None = None
    taps: list[torch.Tensor] = field(default_factory=list)  # per token: [H] (one tap) or [L, H], if collected
    scores: list[float] = field(default_factory=list)  # per token probe score, with a probe
    emas: list[float] = field(default_factory=list)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class Monitor(Protocol):
    """What the loop asks of a guard (see `oc_engine.engine.guarded.GuardMonitor`)."""

    def on_token(self, index: int, token: int, score: float | None, ema: float | None, flags: int) -> None: ...
    def on_finish(self, index: int) -> None: ...
    def wants_tokens(self, index: int) -> bool: ...
    def waiting(self, index: int) -> bool: ...
    def poll(self) -> None: ...
    def wait(self) -> None: ...
    def drain(self) -> None: ...


# on_text(sequence index, newly released text)
TextCallback = Callable[[int, str], None]


class Engine:
    """Generation over one loaded model, with an optional probe inside the step.

    tap: which entries of Hugging Face's `output_hidden_states` the step returns (an int or
    several; 0 = embeddings, -1 = after the final norm). A probe sets them to its layers.
    Without a tap or probe, the step returns nothing extra and costs nothing extra.
    output_lag: steps the host reads behind the device (default: 1 on CUDA, 0 on CPU).
    """

    def __init__(self, loaded: LoadedModel, *, compile: bool = True, tap: int | Sequence[int] | None = None,
                 probe: Probe | None = None, prefer_fused: bool = True, output_lag: int | None = None):
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device, self.dtype = loaded.device, loaded.dtype
        self.runner = build_runner(self.model, prefer_fused=prefer_fused)
        self.compile = compile
        self.output_lag = accel.default_output_lag(self.device) if output_lag is None else output_lag
        self.num_layers = self.runner.num_layers
        self.probe = probe
        if probe is not None:
            probe.check_model(self.model)
            tap = probe.config.layers
        self.taps = self._normalize_taps(tap)
        config = self.model.config.get_text_config()
        self.context = int(getattr(config, "max_position_embeddings", 0) or 2 ** 31)
        self.eos_ids = self._eos_ids()
        self._steps: dict[tuple, Callable] = {}
        self._cache: StaticKVCache | None = None

    # -- public -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], config: GenerationConfig = GenerationConfig(), *,
                 on_text: TextCallback | None = None, collect_taps: bool = False,
                 monitor: Monitor | None = None) -> list[SequenceResult]:
        """Generate for each prompt (token ids); returns one result per prompt, in order."""
        if not prompts:
            return []
        limits = self._limits(prompts, config.max_new_tokens)
        batch = len(prompts)
        # Each sequence samples from its own random stream (see `sampling`): its tokens do not
        # depend on its neighbours, nor on how long its decoding waited for a verdict.
        seed = config.seed if config.seed is not None else random.SystemRandom().getrandbits(64)
        keys = sequence_keys(seed, batch, self.device)
        start = time.perf_counter()
        # + output_lag: with a lagged read, a row may run that many steps past its last token
        # before the host sees it finish; those writes must stay inside the cache.
        cache = self._cache_for(batch, max(len(p) + n for p, n in zip(prompts, limits)) + self.output_lag)
        step = self._step(config.sampling, cache.max_len, batch)
        probe = ProbeRuntime(self.probe, batch, self.device) if self.probe is not None else None
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        advance = torch.ones(batch, 1, dtype=torch.long, device=self.device)  # 0 freezes a waiting row
        waiting = [False] * batch
        results = [SequenceResult(i, list(p)) for i, p in enumerate(prompts)]
        streams = [TextStream(self.tokenizer, config.stop_strings) for _ in prompts]
        first_token_at = [0.0] * batch

        def accept(r: SequenceResult, token: int, tapped, score, ema, flags: int) -> None:
            self._accept(r, streams[r.index], token, limits[r.index], config, on_text, collect_taps,
                         tapped, score, ema)
            if monitor is not None:
                monitor.on_token(r.index, token, score, ema, flags)
                if r.finished:
                    monitor.on_finish(r.index)
                elif not monitor.wants_tokens(r.index):
                    r.finish_reason = "guard"

        with torch.inference_mode():
            for b, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
                prompt_pos = torch.arange(len(prompt), device=self.device)[None]
                logits, tapped = self.runner(ids, prompt_pos, cache.rows(b, b + 1), self.taps)
                first = sample(logits, config.sampling, keys[b:b + 1], prompt_pos[:, -1])
                tokens[b, 0] = first[0]
                pos[b, 0] = len(prompt)
                token = int(first[0])
                first_token_at[b] = time.perf_counter()
                results[b].prefill_ms = (first_token_at[b] - t0) * 1000
                results[b].ttft_ms = (first_token_at[b] - start) * 1000
                score = ema = None
                flags = 0
                if probe is not None:
                    s, e, f = probe.score_row(tapped, b)
                    score, ema, flags = float(s[0]), float(e[0]), int(f[0])
                accept(results[b], token, None if tapped is None else tapped[:, 0], score, ema, flags)

            reader = accel.StepReader(self.device, self.output_lag)
            inflight: deque = deque()  # launched steps whose outputs the host has not read yet
            active = [r for r in results if not r.finished]
            for r in results:
                if r.finished:
                    self._freeze(r.index, advance, probe)
            while active or inflight:
                if monitor is not None:
                    monitor.poll()
                    for r in active:
                        if self._stop_if_unwanted(r, monitor):
                            self._freeze(r.index, advance, probe)
                    active = [r for r in active if not r.finished]
                    all_wait = self._update_waiting(active, monitor, waiting, advance, probe)
                else:
                    all_wait = False
                launch = bool(active) and not all_wait
                if launch:
                    advanced = [not waiting[b] for b in range(batch)]  # rows this step moves forward
                    next_tokens, tapped, score, ema, flags = step(tokens, pos, cache.all_rows(), probe, keys)
                    pos += advance
                    tokens.copy_(torch.where(advance.bool(), next_tokens[:, None], tokens))
                    outputs = [next_tokens] + ([score, ema, flags] if probe is not None else [])
                    kept_taps = tapped.clone() if collect_taps and tapped is not None else None
                    inflight.append((reader.stage(outputs), advanced, kept_taps))
                if inflight and (len(inflight) > self.output_lag or not launch):
                    handle, advanced, kept_taps = inflight.popleft()
                    host = reader.read(handle)  # the loop's one wait per step, `output_lag` steps behind
                    for r in active:
                        b = r.index
                        if not advanced[b] or r.finished:
                            continue  # a frozen row recomputed its last position: nothing new
                        s, e, f = (host[1][b], host[2][b], host[3][b]) if probe is not None else (None, None, 0)
                        accept(r, host[0][b], None if kept_taps is None else kept_taps[:, b], s, e, f)
                        if r.finished:
                            self._freeze(b, advance, probe)
                    active = [r for r in active if not r.finished]
                elif all_wait:
                    monitor.wait()  # every live sequence waits for a verdict
            if monitor is not None:
                monitor.drain()
        end = time.perf_counter()
        for r in results:
            if len(r.token_ids) > 1:
                r.decode_tokens_per_s = (len(r.token_ids) - 1) / max(end - first_token_at[r.index], 1e-9)
        return results

    def decode_one_token(self, tokens: torch.Tensor, pos: torch.Tensor, cache_rows, sampling: SamplingConfig,
                         probe: ProbeRuntime | None, keys: torch.Tensor | None = None):
        """tokens [B, 1], pos [B, 1], keys [B] (each sequence's random stream) ->
        (next [B], tapped [L, B, H] | None, score, ema, flags [B] | None).

        No host sync: sampling, the probe score and the EMA update all stay on the device.
        """
        logits, tapped = self.runner(tokens, pos, cache_rows, self.taps)
        next_tokens = sample(logits, sampling, keys, pos[:, 0])
        if probe is None:
            return next_tokens, tapped, None, None, None
        score, ema, flags = probe.score(tapped)
        return next_tokens, tapped, score, ema, flags

    # -- internals ----------------------------------------------------------------------
    def _accept(self, result: SequenceResult, stream: TextStream, token: int, limit: int,
                config: GenerationConfig, on_text: TextCallback | None, collect_taps: bool,
                tapped, score, ema) -> None:
        result.token_ids.append(token)
        if collect_taps and tapped is not None:
            result.taps.append((tapped[0] if tapped.shape[0] == 1 else tapped).float().cpu().clone())
        if score is not None:
            result.scores.append(score)
            result.emas.append(ema)
        piece = stream.push(token)
        if stream.stopped:
            result.finish_reason = "stop"
        elif token in self.eos_ids and not config.ignore_eos:
            result.finish_reason = "eos"
        elif len(result.token_ids) >= limit:
            result.finish_reason = "length"
        if result.finished:
            piece += stream.finish()
        result.text += piece
        if piece and on_text is not None:
            on_text(result.index, piece)

    @staticmethod
    def _stop_if_unwanted(result: SequenceResult, monitor: Monitor) -> bool:
        if not result.finished and not monitor.wants_tokens(result.index):
            result.finish_reason = "guard"
        return result.finished

    @staticmethod
    def _freeze(row: int, advance: torch.Tensor, probe: ProbeRuntime | None) -> None:
        """A finished row stops advancing, so its position never runs past its cache row."""
        advance[row, 0] = 0
        if probe is not None:
            probe.active[row] = False

    @staticmethod
    def _update_waiting(active, monitor: Monitor, waiting: list[bool], advance: torch.Tensor,
                        probe: ProbeRuntime | None) -> bool:
        """Freeze the rows whose guard holds too many tokens; True if every live row waits."""
        for r in active:
            now = monitor.waiting(r.index)
            if now != waiting[r.index]:
                waiting[r.index] = now
                advance[r.index, 0] = 0 if now else 1
                if probe is not None:
                    probe.active[r.index] = not now
        return bool(active) and all(waiting[r.index] for r in active)

    def _limits(self, prompts: list[list[int]], max_new_tokens: int) -> list[int]:
        limits = []
        for i, prompt in enumerate(prompts):
            if not prompt:
                raise OcEngineError(f"prompt {i + 1} is empty after tokenization")
            room = self.context - len(prompt)
            if room < 1:
                raise OcEngineError(f"prompt {i + 1} has {len(prompt)} tokens, longer than the model's "
                                    f"context of {self.context} tokens")
            limits.append(min(max_new_tokens, room))
        return limits

    def _cache_for(self, batch: int, needed: int) -> StaticKVCache:
        max_len = min(-(-needed // CACHE_BUCKET) * CACHE_BUCKET, max(self.context, needed))
        cache = self._cache
        if cache is None or cache.batch != batch or cache.max_len != max_len:
            self._cache = cache = StaticKVCache(batch, max_len, self.device, self.dtype)
        return cache

    def _step(self, sampling: SamplingConfig, max_len: int, batch: int) -> Callable:
        if not self.compile:
            return lambda tokens, pos, rows, probe, keys: self.decode_one_token(tokens, pos, rows, sampling, probe,
                                                                                keys)
        key = (sampling, max_len, batch)
        if key not in self._steps:
            def step(tokens, pos, rows, probe, keys, _sampling=sampling):
                return self.decode_one_token(tokens, pos, rows, _sampling, probe, keys)
            self._steps[key] = accel.compile_step(step, self.device)
        return self._steps[key]

    def _normalize_taps(self, tap: int | Sequence[int] | None) -> tuple[int, ...]:
        if tap is None:
            return ()
        points = self.num_layers + 1
        taps = (tap,) if isinstance(tap, int) else tuple(tap)
        for t in taps:
            if not -points <= t < points:
                raise OcEngineError(f"tap layer {t} is out of range for a model with {self.num_layers} layers "
                                    f"(hidden states 0..{self.num_layers}, or negative from the end)")
        return tuple(t % points for t in taps)

    def _eos_ids(self) -> set[int]:
        ids = set()
        generation = getattr(self.model, "generation_config", None)
        eos = getattr(generation, "eos_token_id", None)
        for value in (eos if isinstance(eos, list) else [eos]):
            if value is not None:
                ids.add(int(value))
        if self.tokenizer.eos_token_id is not None:
            ids.add(int(self.tokenizer.eos_token_id))
        return ids
