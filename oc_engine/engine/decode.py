"""The decode loop: prefill each prompt into a static cache, then one compiled step per token.

Read top-down: `GenerationConfig` (validated), `SequenceResult`, then `Engine.generate`:
1. prefill every prompt on its own cache row (no padding; a prompt's result in a batch
   equals its result alone), sampling its first token;
2. step all rows together with `decode_one_token` (compiled once per sampling config and
   cache shape; positions are device tensors updated in place, so nothing recompiles);
3. the Python loop reads the new tokens, streams text and retires finished sequences.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from oc_engine.engine import accel
from oc_engine.engine.kv_cache import StaticKVCache
from oc_engine.engine.loading import LoadedModel
from oc_engine.engine.runners import build_runner
from oc_engine.engine.sampling import SamplingConfig, sample
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


@dataclass
class SequenceResult:
    index: int
    prompt_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "eos", "stop" (a stop string) or "length"
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0  # from the start of generate() to this sequence's first token
    decode_tokens_per_s: float | None = None
    taps: list[torch.Tensor] = field(default_factory=list)  # [H] per generated token, if collected

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


# on_text(sequence index, newly released text)
TextCallback = Callable[[int, str], None]


class Engine:
    """Guard-ready generation over one loaded model.

    tap: which entry of Hugging Face's `output_hidden_states` the step returns for the
    probe (0 = embeddings, -1 = after the final norm; default None = no tap, no cost).
    """

    def __init__(self, loaded: LoadedModel, *, compile: bool = True, tap: int | None = None,
                 prefer_fused: bool = True):
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.device, self.dtype = loaded.device, loaded.dtype
        self.runner = build_runner(self.model, prefer_fused=prefer_fused)
        self.compile = compile
        self.num_layers = self.runner.num_layers
        self.tap = self._normalize_tap(tap)
        config = self.model.config.get_text_config()
        self.context = int(getattr(config, "max_position_embeddings", 0) or 2 ** 31)
        self.eos_ids = self._eos_ids()
        self._steps: dict[tuple, Callable] = {}
        self._cache: StaticKVCache | None = None

    # -- public -------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], config: GenerationConfig = GenerationConfig(), *,
                 on_text: TextCallback | None = None, collect_taps: bool = False) -> list[SequenceResult]:
        """Generate for each prompt (token ids); returns one result per prompt, in order."""
        if not prompts:
            return []
        limits = self._limits(prompts, config.max_new_tokens)
        if config.seed is not None:
            torch.manual_seed(config.seed)
        start = time.perf_counter()
        batch = len(prompts)
        cache = self._cache_for(batch, max(len(p) + n for p, n in zip(prompts, limits)))
        step = self._step(config.sampling, cache.max_len, batch)
        tokens = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        pos = torch.zeros(batch, 1, dtype=torch.long, device=self.device)
        results = [SequenceResult(i, list(p)) for i, p in enumerate(prompts)]
        streams = [TextStream(self.tokenizer, config.stop_strings) for _ in prompts]
        first_token_at = [0.0] * batch

        with torch.inference_mode():
            for b, prompt in enumerate(prompts):
                t0 = time.perf_counter()
                ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
                prompt_pos = torch.arange(len(prompt), device=self.device)[None]
                logits, tap = self.runner(ids, prompt_pos, cache.rows(b, b + 1), self.tap)
                first = sample(logits, config.sampling)
                tokens[b, 0] = first[0]
                pos[b, 0] = len(prompt)
                token = int(first[0])
                first_token_at[b] = time.perf_counter()
                results[b].prefill_ms = (first_token_at[b] - t0) * 1000
                results[b].ttft_ms = (first_token_at[b] - start) * 1000
                self._accept(results[b], streams[b], token, None if tap is None else tap[0], limits[b], config,
                             on_text, collect_taps)

            active = [r for r in results if not r.finished]
            while active:
                next_tokens, taps = step(tokens, pos, cache.all_rows())
                next_tokens = next_tokens.clone()  # CUDA graph outputs are overwritten by the next replay
                pos += 1
                tokens.copy_(next_tokens[:, None])
                host = next_tokens.tolist()
                for r in active:
                    tap = taps[r.index] if taps is not None else None
                    self._accept(r, streams[r.index], host[r.index], tap, limits[r.index], config, on_text,
                                 collect_taps)
                active = [r for r in active if not r.finished]
        end = time.perf_counter()
        for r in results:
            if len(r.token_ids) > 1:
                r.decode_tokens_per_s = (len(r.token_ids) - 1) / max(end - first_token_at[r.index], 1e-9)
        return results

    def decode_one_token(self, tokens: torch.Tensor, pos: torch.Tensor, cache_rows, sampling: SamplingConfig):
        """tokens [B, 1], pos [B, 1] -> (next tokens [B], tap [B, H] | None). No host sync."""
        logits, tap = self.runner(tokens, pos, cache_rows, self.tap)
        return sample(logits, sampling), tap

    # -- internals ----------------------------------------------------------------------
    def _accept(self, result: SequenceResult, stream: TextStream, token: int, tap, limit: int,
                config: GenerationConfig, on_text: TextCallback | None, collect_taps: bool) -> None:
        result.token_ids.append(token)
        if collect_taps and tap is not None:
            result.taps.append(tap.float().cpu().clone())
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
            return lambda tokens, pos, rows: self.decode_one_token(tokens, pos, rows, sampling)
        key = (sampling, max_len, batch)
        if key not in self._steps:
            def step(tokens, pos, rows, _sampling=sampling):
                return self.decode_one_token(tokens, pos, rows, _sampling)
            self._steps[key] = accel.compile_step(step, self.device)
        return self._steps[key]

    def _normalize_tap(self, tap: int | None) -> int | None:
        if tap is None:
            return None
        points = self.num_layers + 1
        if not -points <= tap < points:
            raise OcEngineError(f"tap layer {tap} is out of range for a model with {self.num_layers} layers "
                                f"(hidden states 0..{self.num_layers}, or negative from the end)")
        return tap % points

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
