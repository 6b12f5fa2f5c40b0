"""The exchange classifier at run time: judge (prompt, partial answer) while decoding goes on.

Loads an export directory (model.onnx, tokenizer files, classifier_config.json). Backends:
- CPU: ONNX Runtime's CPU provider, one intra-op thread, in a worker thread at a low priority
  (`WORKER_NICE`), so a check shares the machine with decoding instead of taking it over; a check
  that decoding waits for (`urgent`) runs on a second session with every core;
- CUDA: ONNX Runtime's CUDA provider with `user_compute_stream` set to a dedicated torch
  stream, so its kernels overlap the decode graph; when the CUDA provider is missing, the
  Hugging Face model (`source_model`) on a side stream, chosen automatically with one log line.

`submit(prompt, response)` returns a future of {"verdict", "p_unsafe", "latency_ms", "windows"};
checks queued while the worker is busy run together as one batch (`check_batcher`). What a
check reads is laid out by `exchange_layout`: a text pair within the budget, in windows when
long; its verdict is its worst window's.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import logging
import math
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from oc_engine.errors import OcEngineError
from oc_engine.guard.check_batcher import CheckBatcher, pad
from oc_engine.guard.exchange_layout import INPUT_FORMAT, ExchangeLayout

CLASSIFIER_FORMAT = "oc-engine-classifier/2"
RETIRED_FORMATS = ("oc-engine-classifier/1",)  # `User: ... Assistant: ...`, cut from the right at max_length
log = logging.getLogger("oc_engine.classifier")
BATCH = 32  # windows per model call outside the decode loop (calibration, evaluation)


@dataclass(frozen=True)
class ClassifierConfig:
    labels: tuple[str, ...]
    unsafe_label: int
    allow_threshold: float
    block_threshold: float
    max_length: int
    input_format: str = INPUT_FORMAT
    source_model: str | None = None

    def __post_init__(self):
        if len(self.labels) < 2 or len(set(self.labels)) != len(self.labels):
            raise OcEngineError(f"a classifier needs at least two distinct labels, got {list(self.labels)}")
        if not 0 <= self.unsafe_label < len(self.labels):
            raise OcEngineError(f"unsafe_label {self.unsafe_label} is not one of the {len(self.labels)} labels")
        if not 0 <= self.allow_threshold <= self.block_threshold <= 1:
            raise OcEngineError("classifier thresholds must satisfy 0 <= allow <= block <= 1, got "
                                f"allow={self.allow_threshold}, block={self.block_threshold}")
        if self.max_length < 8:
            raise OcEngineError(f"classifier max_length must be >= 8 tokens, got {self.max_length}")
        check_input_format(self.input_format)

    def verdict(self, p_unsafe: float) -> str:
        if not math.isfinite(p_unsafe):
            return "error"  # a NaN compares false with both thresholds: never let it read as allow
        if p_unsafe >= self.block_threshold:
            return "block"
        return "allow" if p_unsafe < self.allow_threshold else "uncertain"


def check_input_format(input_format) -> None:
    """Only the text-pair layout (`exchange_layout`) is read: a template string that glued the
    prompt and the answer into one text could be forged by the prompt and was cut from the right."""
    if input_format != INPUT_FORMAT:
        raise OcEngineError(f"input_format must be {INPUT_FORMAT!r} (the request and the answer as a text pair), "
                            f"got {input_format!r}")


def load_classifier_config(path: Path) -> ClassifierConfig:
    from oc_engine.config_fields import Fields

    file = path / "classifier_config.json"
    if not file.is_file():
        raise OcEngineError(f"{path} is not a classifier export (no classifier_config.json)")
    try:
        raw = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OcEngineError(f"{file} is not valid JSON: {exc}") from exc
    fields = Fields(raw, str(file))
    if raw.get("format") in RETIRED_FORMATS:
        raise OcEngineError(f"{file}: this classifier was trained for the retired {raw['format']} input "
                            "(`User: ... Assistant: ...`, cut at max_length, so a long prompt hid the answer); "
                            "retrain it with `oc-engine train-classifier`")
    if raw.get("format") != CLASSIFIER_FORMAT:
        raise OcEngineError(f"{file}: not an oc-engine classifier (format {CLASSIFIER_FORMAT!r} expected)")
    try:
        return ClassifierConfig(labels=fields.strings("labels"), unsafe_label=fields.integer("unsafe_label"),
                                allow_threshold=fields.number("allow_threshold"),
                                block_threshold=fields.number("block_threshold"),
                                max_length=fields.integer("max_length"),
                                input_format=fields.string("input_format", INPUT_FORMAT),
                                source_model=fields.string("source_model", None))
    except OcEngineError as exc:
        message = str(exc)
        raise OcEngineError(message if message.startswith(str(file)) else f"{file}: {message}") from None


def load_sequence_classifier(source, **kwargs):
    """A Hugging Face sequence classifier with sdpa attention, or eager where the architecture
    has no sdpa (DeBERTa-v2/v3). Never flash attention: it does not export to ONNX. Weights from
    safetensors only (a pickle checkpoint is refused, whatever torch's defaults)."""
    from transformers import AutoModelForSequenceClassification

    from oc_engine.models.loading import offline_kwargs

    kwargs = {"use_safetensors": True, **offline_kwargs(source), **kwargs}
    try:
        return AutoModelForSequenceClassification.from_pretrained(source, attn_implementation="sdpa", **kwargs)
    except ValueError as exc:
        if "scaled_dot_product_attention" not in str(exc):
            raise
        return AutoModelForSequenceClassification.from_pretrained(source, attn_implementation="eager", **kwargs)


def model_inputs(model, encoded) -> dict:
    """The tokenizer outputs that the model's forward accepts (a BERT tokenizer's token_type_ids
    are dropped for ModernBERT, say)."""
    import inspect

    accepted = inspect.signature(model.forward).parameters
    return {k: v for k, v in encoded.items() if k in accepted}


# The worker's niceness on CPU. Decoding keeps both cores busy, so a check gets only what the
# scheduler gives this weight. Measured on the guard bench's escalating answer (2 cores, catch-up
# "replay"): at nice 19 (weight 15 against decoding's 1024; 12 runs) checks took 350-650 ms, two
# in a row outlasted 64 tokens and decoding waited at --max-held (largest gap during a check
# 1.7-2.5x the median); at nice 10 (6 runs) checks took 90-350 ms but slowed the steps beside
# them (1.6-2.0x); at nice 15 (weight 36; 6 runs) checks took 250-600 ms and decoding never
# waited (1.4-1.5x).
# SCHED_IDLE starved the checks (1.1 s) into waits at --max-held.
WORKER_NICE = 15


def _lower_thread_priority(nice: int = WORKER_NICE) -> None:
    """`nice` for the calling thread (Linux: per-thread priorities); elsewhere nothing."""
    import threading

    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


class ExchangeClassifier:
    """inline: checks run between decode steps on the loop's thread (`drain`) instead of in a
    worker beside decoding; default: inline on CPU, where a worker competes with decoding for
    the same cores, and a worker on CUDA, where it runs on its own stream."""

    def __init__(self, path: str | Path, *, device: str = "cpu", backend: str = "auto", inline: bool | None = None):
        from transformers import AutoTokenizer

        self.path = Path(path)
        if not self.path.is_dir():
            raise OcEngineError(f"classifier directory not found: {self.path}")
        self.config = load_classifier_config(self.path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.path)
        except (OSError, ValueError) as exc:
            raise OcEngineError(f"{self.path}: cannot load the classifier's tokenizer ({exc})") from exc
        try:
            self.layout = ExchangeLayout(self.tokenizer, self.config.max_length)
        except OcEngineError as exc:
            raise OcEngineError(f"{self.path}: {exc}") from None
        self.device = device
        self.backend = self._choose_backend(backend)
        # On CPU the check shares the cores with decoding: the worker runs at a low priority,
        # so decode steps keep their pace and the check uses the time they leave. Checks queued
        # while it is busy run together as one batch (see `check_batcher`).
        initializer = _lower_thread_priority if not device.startswith("cuda") else None
        self._pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        self.inline = not device.startswith("cuda") if inline is None else inline
        self._batcher = CheckBatcher(self._logits, pad_id=self._pad_id, initializer=initializer, inline=self.inline)

    # -- public -------------------------------------------------------------------------
    def probabilities(self, prompts: list[str], responses: list[str], urgent: bool = False) -> np.ndarray:
        """[N, num_labels] class probabilities for N exchanges, each whole: of an exchange judged
        in several windows, the row of its worst window (the highest p_unsafe)."""
        windows = [self.layout.windows(p, r) for p, r in zip(prompts, responses)]
        flat = [item for items in windows for item in items]
        if not flat:
            return np.zeros((0, len(self.config.labels)), dtype=np.float32)
        probs = np.concatenate([_softmax(self._logits(pad(flat[i:i + BATCH], self._pad_id), urgent))
                                for i in range(0, len(flat), BATCH)])
        rows, start = [], 0
        for items in windows:
            chunk = probs[start:start + len(items)]
            rows.append(chunk[int(chunk[:, self.config.unsafe_label].argmax())])
            start += len(items)
        return np.stack(rows)

    def judge(self, prompt: str, response: str, urgent: bool = False) -> dict:
        start = time.perf_counter()
        items = self.layout.windows(prompt, response)
        return self._verdict_of(self._logits(pad(items, self._pad_id), urgent), start)

    def submit(self, prompt: str, response: str, urgent: bool = False, judged_chars: int = 0) -> cf.Future:
        """Judge in the worker thread, decoding continuing meanwhile; inline, at the next `drain`.

        The text is laid out and tokenized here, on the caller's thread (a fraction of a
        millisecond), so the low-priority worker only pads and runs the model, which releases
        the GIL: a worker preempted while holding the GIL would stall the decode loop (priority
        inversion). Each window of the check is one item of the batch; the verdict waits for all.
        urgent: decoding is waiting for this verdict, so on CPU the check may use every core
        (a second session with all threads) instead of the one it shares with decoding.
        judged_chars: the answer's first characters an earlier allowed check already judged.
        """
        start = time.perf_counter()
        parts = [self._batcher.submit(item, urgent) for item in self.layout.windows(prompt, response, judged_chars)]
        result: cf.Future = cf.Future()
        remaining = [len(parts)]
        lock = threading.Lock()

        def done(_future: cf.Future) -> None:
            with lock:
                remaining[0] -= 1
                if remaining[0] or result.done():
                    return
            if any(part.cancelled() for part in parts):
                result.cancel()
                return
            error = next((part.exception() for part in parts if part.exception() is not None), None)
            if result.set_running_or_notify_cancel():
                if error is not None:
                    result.set_exception(error)
                else:
                    result.set_result(self._verdict_of(np.stack([part.result() for part in parts]), start))

        for part in parts:
            part.add_done_callback(done)

        def dropped(future: cf.Future) -> None:  # the guard dropped it: drop its windows too
            if future.cancelled():
                for part in parts:
                    part.cancel()

        result.add_done_callback(dropped)
        return result

    def _verdict_of(self, logits: np.ndarray, start: float) -> dict:
        """logits [windows, labels] of one check -> the verdict dict of its worst window."""
        p_unsafe = float(_softmax(logits)[:, self.config.unsafe_label].max())
        return {"verdict": self.config.verdict(p_unsafe), "p_unsafe": round(p_unsafe, 6),
                "latency_ms": round((time.perf_counter() - start) * 1000, 3), "backend": self.backend,
                "windows": int(logits.shape[0])}

    def drain(self) -> None:
        """Inline: run the queued checks now (the decode loop calls it between steps)."""
        self._batcher.drain()

    def close(self) -> None:
        self._batcher.close()

    # -- backends -----------------------------------------------------------------------
    def _choose_backend(self, backend: str) -> str:
        import onnxruntime as ort

        cuda = self.device.startswith("cuda")
        if backend == "auto":
            backend = "onnx" if not cuda or "CUDAExecutionProvider" in ort.get_available_providers() else "torch"
            if backend == "torch":
                log.warning("oc-engine: ONNX Runtime has no CUDA provider here; the classifier runs in PyTorch "
                            "on a side CUDA stream")
        if backend == "onnx":
            if not (self.path / "model.onnx").is_file():
                raise OcEngineError(f"{self.path} has no model.onnx")
            options = ort.SessionOptions()
            options.intra_op_num_threads = 1
            if cuda:
                import torch

                self._stream = torch.cuda.Stream(device=self.device)
                providers = [("CUDAExecutionProvider", {"device_id": torch.device(self.device).index or 0,
                                                        "user_compute_stream": str(self._stream.cuda_stream)}),
                             "CPUExecutionProvider"]
            else:
                providers = ["CPUExecutionProvider"]
            try:
                self._session = ort.InferenceSession(str(self.path / "model.onnx"), options, providers=providers)
            except Exception as exc:  # noqa: BLE001 - onnxruntime raises its own types
                raise OcEngineError(f"{self.path / 'model.onnx'} cannot be loaded: {exc}") from exc
            if cuda and not runs_on_cuda(self._session):
                # ONNX Runtime falls back to its CPU provider with only a warning when the CUDA
                # provider cannot load (onnxruntime-gpu needs CUDA libraries, cuRAND among them,
                # that nothing in uv.lock installs): the check would then take the CPU.
                log.warning("oc-engine: ONNX Runtime's CUDA provider did not load (providers: %s); the "
                            "classifier runs in PyTorch on a side CUDA stream", self._session.get_providers())
                self._session = None
                return self._load_torch()
            self._urgent_session = self._session
            if not cuda and (threads := os.cpu_count() or 1) > 1:
                options.intra_op_num_threads = threads
                # Its pool threads must not spin after a check: they would take cores from decoding.
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
                self._urgent_session = ort.InferenceSession(str(self.path / "model.onnx"), options,
                                                            providers=providers)
            self._inputs = [i.name for i in self._session.get_inputs()]
            return "onnx"
        if backend == "torch":
            return self._load_torch()
        raise OcEngineError(f"unknown classifier backend {backend!r} (auto, onnx or torch)")

    def _load_torch(self) -> str:
        import torch

        source = self.config.source_model
        if not source or not Path(source).is_dir():
            raise OcEngineError(f"the PyTorch classifier backend needs source_model, which is missing: {source}")
        self._model = load_sequence_classifier(source).to(self.device).eval()
        self._stream = torch.cuda.Stream(device=self.device) if self.device.startswith("cuda") else None
        return "torch"

    def _logits(self, encoded, urgent: bool = False) -> np.ndarray:
        if self.backend == "onnx":
            feeds = {name: encoded[name].astype(np.int64) for name in self._inputs}
            return (self._urgent_session if urgent else self._session).run(["logits"], feeds)[0]
        import torch

        arrays = model_inputs(self._model, encoded)
        with torch.inference_mode():
            if self._stream is not None:
                # Everything on the classifier's own stream, the copies from pinned memory: on
                # the default stream they would queue behind the decode graphs.
                with torch.cuda.stream(self._stream):
                    inputs = {k: torch.from_numpy(v).pin_memory().to(self.device, non_blocking=True)
                              for k, v in arrays.items()}
                    logits = self._model(**inputs).logits.float()
                self._stream.synchronize()
            else:
                inputs = {k: torch.from_numpy(v).to(self.device) for k, v in arrays.items()}
                logits = self._model(**inputs).logits.float()
        return logits.cpu().numpy()


def runs_on_cuda(session) -> bool:
    """Whether an ONNX Runtime session really runs on the CUDA provider (not its CPU fallback)."""
    return "CUDAExecutionProvider" in session.get_providers()


def _softmax(logits: np.ndarray) -> np.ndarray:
    """[N, labels] logits -> probabilities, row by row."""
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)
