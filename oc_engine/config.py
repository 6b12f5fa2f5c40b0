"""The engine's settings, every default written once.

    LLM(model, EngineConfig(dtype="bfloat16", max_num_seqs=16), GuardSetup(probe="my-probe/"))

- `EngineConfig`: how a model is loaded and run (precision, device, compilation, cache slots
  and length, quantization, chat template).
- `GuardSetup`: what guards it: the probe, the exchange classifier and the policy
  (`GuardConfig`, per request overridable). `UNGUARDED` is plain generation.
- `DebugOptions`: knobs for tools and tests (which layers the step taps, the fused runner,
  the host's read lag); no user needs them.

Each validates itself on construction with a one-line error; the native `LLM`, the vLLM
backend and the CLI (whose options take their defaults from these fields) build on them.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from oc_engine.config_fields import is_int
from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import GuardConfig

DEFAULT = "default"  # a setting resolved by the engine: the shipped probe, classifier, policy
DTYPES = ("auto", "float32", "bfloat16", "float16")
QUANTIZATIONS = ("int8", "int4")
MAX_MODEL_LEN_CAP = 2048  # the default cache length: memory, and (whole-cache attention) time
# Step batch sizes compiled beside max_num_seqs: in a 16-slot engine here one row cost 9.4 ms a step,
# four 16.5 and sixteen 30 (runs/2026-12-07-batch-buckets-step); each bucket is two compiles.
BATCH_BUCKETS = (1, 4)


def check_int(name: str, value, minimum: int) -> int:
    """An int (not a bool: JSON true is not 1) of at least `minimum`, or a one-line error."""
    if not is_int(value) or value < minimum:
        raise OcEngineError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def check_quantization(scheme: str | None) -> str | None:
    """None (or the CLI's "none") for no quantization, else a known scheme."""
    if scheme in (None, "none"):
        return None
    if scheme not in QUANTIZATIONS:
        raise OcEngineError(f"unknown quantization {scheme!r}; choose one of {', '.join(QUANTIZATIONS)}")
    return scheme


def check_bool(name: str, value) -> bool:
    if not isinstance(value, bool):
        raise OcEngineError(f"{name} must be true or false, got {value!r}")
    return value


@dataclass(frozen=True)
class EngineConfig:
    """dtype: "auto" (bf16 on CUDA and on CPUs with native bf16, else fp32) or a precision.
    device: "auto", "cpu", "cuda" or "cuda:N".
    compile: torch.compile the decode step (vLLM: its own compilation; False is enforce_eager).
    max_num_seqs: cache slots, the requests decoded together; each costs compute every step.
    max_model_len: prompt plus answer, in tokens (None: the model's context, at most 2048).
    prefill_chunk: prompt tokens prefilled per step at most (None: a prompt at once); a long
    prompt joining then costs the running requests one chunk per step, not the whole prompt.
    batch_buckets: batch sizes below max_num_seqs that the decode step is also compiled for
    (each at warm-up): a step runs over the smallest that holds its live requests, so a lone
    request does not pay for every slot. Sizes at or above max_num_seqs are dropped.
    quantize: None, "int8" or "int4" weight-only quantization of the linear layers.
    chat_template: render text prompts as the user turn of the model's chat template.
    trust_remote_code: allow model code from the hub (off unless asked)."""

    dtype: str = "auto"
    device: str = "auto"
    compile: bool = True
    max_num_seqs: int = 8
    max_model_len: int | None = None
    prefill_chunk: int | None = 256
    batch_buckets: tuple[int, ...] = BATCH_BUCKETS
    quantize: str | None = None
    chat_template: bool = True
    trust_remote_code: bool = False

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise OcEngineError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if not isinstance(self.device, str):
            raise OcEngineError(f"device must be text (auto, cpu, cuda or cuda:N), got {self.device!r}")
        check_int("max_num_seqs", self.max_num_seqs, 1)
        if self.max_model_len is not None:
            check_int("max_model_len", self.max_model_len, 2)
        if self.prefill_chunk is not None:
            check_int("prefill_chunk", self.prefill_chunk, 1)
        if not isinstance(self.batch_buckets, (tuple, list)):
            raise OcEngineError(f"batch_buckets must be a list of integers, got {self.batch_buckets!r}")
        for size in self.batch_buckets:
            check_int("each of batch_buckets", size, 1)
        object.__setattr__(self, "batch_buckets", tuple(sorted(set(self.batch_buckets))))
        object.__setattr__(self, "quantize", check_quantization(self.quantize))
        for name in ("compile", "chat_template", "trust_remote_code"):
            check_bool(name, getattr(self, name))

    def model_len(self, context: int) -> int:
        """The cache length for a model of this context: `max_model_len`, or the default."""
        length = min(context, MAX_MODEL_LEN_CAP) if self.max_model_len is None else self.max_model_len
        if not 2 <= length <= context:
            raise OcEngineError(f"max_model_len must be an integer in [2, {context}] (the model's context), "
                                f"got {length!r}")
        return length

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class GuardSetup:
    """probe: "default" (the probe shipped for the embedded model; none for other models), a
    probe directory, a `Probe`, or None for unguarded generation.
    classifier: "default" (the classifier shipped in the package, built into the cache on first
    use), an export or delta directory, an object with `submit(prompt, response, urgent,
    judged_chars)` returning a future, or None (a pause blocks).
    policy: the guard policy; None: `GuardConfig(every=<the probe's cadence>)`. Its final check
    (`final_check=None`) is on for calls that do not stream and off for those that do.
    record_trace: keep every token's guard state (`generate --trace`, the audit)."""

    probe: Any = DEFAULT
    classifier: Any = DEFAULT
    policy: GuardConfig | None = None
    record_trace: bool = False

    def __post_init__(self):
        if self.policy is not None and not isinstance(self.policy, GuardConfig):
            raise OcEngineError(f"the guard policy must be a GuardConfig or None, got {self.policy!r}")
        if self.probe is None and self.policy is not None:
            raise OcEngineError("a guard policy needs a probe")
        check_bool("record_trace", self.record_trace)


UNGUARDED = GuardSetup(probe=None, classifier=None)


@dataclass(frozen=True)
class DebugOptions:
    """tap: hidden-state layers the step returns without a probe (an int or several; 0 =
    embeddings, -1 = after the final norm). prefer_fused: the engine's own Llama runner where it
    applies (False: Hugging Face's modules). output_lag: steps the host reads behind the device
    (None: 1 on CUDA, 0 on CPU)."""

    tap: Any = None
    prefer_fused: bool = True
    output_lag: int | None = None

    def __post_init__(self):
        check_bool("prefer_fused", self.prefer_fused)
        if self.output_lag is not None:
            check_int("output_lag", self.output_lag, 0)
