"""`SamplingParams`: what one request asks for (vLLM's name and fields, where they exist).

Plain Python (no torch), like the scheduler and the sequence state."""

from __future__ import annotations

from dataclasses import dataclass

from oc_engine.config_fields import is_int, is_number
from oc_engine.errors import OcEngineError


@dataclass(frozen=True)
class SamplingConfig:
    """temperature 0 means greedy; top_k and top_p restrict the candidates when sampling."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not is_number(self.temperature) or not 0 <= self.temperature < float("inf"):
            raise OcEngineError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if self.top_k is not None and (not is_int(self.top_k) or self.top_k < 1):
            raise OcEngineError(f"top-k must be >= 1, got {self.top_k}")
        if self.top_p is not None and (not is_number(self.top_p) or not 0 < self.top_p <= 1):
            raise OcEngineError(f"top-p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class SamplingParams:
    """max_tokens: the most tokens to generate (fewer if the prompt leaves less room).
    temperature 0 is greedy; top_k and top_p restrict the candidates when sampling.
    seed: a reproducible random stream (each prompt of a `generate` call gets its own).
    stop: texts that end the answer (not included in it). ignore_eos: run to max_tokens."""

    max_tokens: int = 256
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise OcEngineError(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        object.__setattr__(self, "stop", tuple(self.stop))
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise OcEngineError("a stop string must be non-empty text")
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2 ** 64):
            raise OcEngineError(f"seed must be an integer in [0, 2^64), got {self.seed!r}")
        if not isinstance(self.ignore_eos, bool):
            raise OcEngineError(f"ignore_eos must be true or false, got {self.ignore_eos!r}")
        self.sampling  # validates temperature, top_k and top_p

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
