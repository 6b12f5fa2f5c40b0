"""`VllmLLM`: oc-engine's guarded generation with vLLM doing the decoding.

    from oc_engine_vllm import VllmLLM
    llm = VllmLLM()                 # the embedded model and its default probe and classifier
    completions = llm.generate(["Write a haiku"], SamplingParams(max_tokens=64))
    llm.close()

The same requests, guard policy and results as `oc_engine.LLM` (it shares its request
preparation, `SequenceMonitor`, classifier runtime and `Completion`), over vLLM's `AsyncLLM`:
vLLM schedules, batches and decodes in its own processes; the probe-augmented model scores
every token there and the logits processor writes each score and EMA to a shared-memory table
(`score_table`); the guard runs here (`request_driver`). vLLM and every request live on one
event loop on this object's thread, so any thread (or another event loop: the server's) can
call in. `async_engine()` gives the server its engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures as cf
import itertools
import json
import threading
from pathlib import Path
from typing import Callable

from oc_engine.config import DEFAULT, EngineConfig, GuardSetup
from oc_engine.engine.requests import PreparesRequests
from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import GuardConfig
from oc_engine.llm import eos_token_ids
from oc_engine.outputs import Finished
from oc_engine.params import SamplingParams

LOGITS_PROCESSOR = "oc_engine_vllm.logits_processor:ProbeEmaLogitsProcessor"
ROWS_PER_SLOT = 2  # score-table rows per running request: vLLM keeps a backlog it can admit at once


class RowPool:
    """The score table's rows, handed out on the backend loop; a request waits for a free one."""

    def __init__(self, rows: int):
        self._free = list(range(rows - 1, -1, -1))
        self._available = asyncio.Condition()
        self.waiting = 0

    async def acquire(self) -> int:
        async with self._available:
            self.waiting += 1
            try:
                await self._available.wait_for(lambda: bool(self._free))
            finally:
                self.waiting -= 1
            return self._free.pop()

    def release(self, row: int) -> None:
        self._free.append(row)

        async def notify():
            async with self._available:
                self._available.notify()

        asyncio.get_running_loop().create_task(notify())


VLLM_NO_READER = ("a state reader reads the native engine's tapped states; --backend vllm takes an exchange "
                  "classifier (an export or delta directory, or embedded:encoder)")

class VllmLLM(PreparesRequests):
    """model: a local Hugging Face directory, a .gguf file, or None for the embedded model.
    config, guard: as `oc_engine.LLM` (`EngineConfig`, `GuardSetup`). vLLM takes the engine's
    dtype, slots, length, chat template and remote-code settings; `compile=False` is vLLM's
    `enforce_eager` (a faster start, slower decoding); device and quantization are vLLM's own
    (its platform; a quantized checkpoint). The probe's weights load from its directory (a
    `Probe` from `load_probe` carries it), its thresholds from the `Probe` given.
    kv_cache_bytes: vLLM's KV cache [default: room for max_num_seqs full-length requests]."""

    def __init__(self, model=None, config: EngineConfig | None = None, guard: GuardSetup | None = None, *,
                 kv_cache_bytes: int | None = None, log: Callable[[str], None] | None = None):
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from oc_engine.guard.classifier import ExchangeClassifier
        from oc_engine.guard.state_reader import is_reader_dir
        from oc_engine.guard.probe import Probe, load_probe
        from oc_engine.models.defaults import resolve_classifier_dir, resolve_probe_dir
        from oc_engine.models.loading import resolve_model_source
        from oc_engine_vllm.plugin import ARCHITECTURES
        from oc_engine_vllm.score_table import ScoreTable

        self.log = log or (lambda message: None)
        self.config = engine = config if config is not None else EngineConfig()
        setup = guard if guard is not None else GuardSetup()
        self.check_config(engine)
        self.model_dir = resolve_model_source(model)
        if not Path(self.model_dir).is_dir():
            raise OcEngineError(f"the vLLM backend needs a local model directory or .gguf file, got {model!r}")
        hf_config = AutoConfig.from_pretrained(self.model_dir, trust_remote_code=engine.trust_remote_code)
        self.architecture = (hf_config.architectures or ["?"])[0]
        probe = resolve_probe_dir(None, model is None, self.log) if setup.probe == DEFAULT else setup.probe
        self.probe = probe if probe is None or isinstance(probe, Probe) else load_probe(probe)
        self.probe_dir = None if self.probe is None else self.probe.source
        if self.probe is not None and self.probe_dir is None:
            raise OcEngineError("the vLLM backend loads the probe's weights from its directory: give the directory, "
                                "or a Probe from load_probe")
        if self.probe is not None and self.architecture not in ARCHITECTURES:
            raise OcEngineError(f"the vLLM plugin probes {', '.join(sorted(ARCHITECTURES))}; this model is "
                                f"{self.architecture}")
        if self.probe is not None:
            self.probe.check_fingerprint(embedding_fingerprint(self.model_dir, hf_config, self.architecture))
        if self.probe is None and setup.policy is not None:
            raise OcEngineError("a guard policy needs a probe")
        self.guard_config = (setup.policy or GuardConfig(every=self.probe.config.every)) \
            if self.probe is not None else None
        self.record_trace, self.chat_template = setup.record_trace, engine.chat_template
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_dir, trust_remote_code=engine.trust_remote_code)
        context = int(getattr(hf_config.get_text_config(), "max_position_embeddings", 0) or 2 ** 31)
        self.max_model_len = engine.model_len(context)
        self._vocab = int(hf_config.get_text_config().vocab_size)
        generation = GenerationConfig.from_pretrained(self.model_dir) \
            if (Path(self.model_dir) / "generation_config.json").is_file() else None
        self.eos_ids = eos_token_ids(generation, self.tokenizer)
        self._ids = itertools.count()
        self._tags = itertools.count(1)
        self._args = engine_args(self.model_dir, hf_config, probe_dir=self.probe_dir,
                                 dtype=engine.dtype, max_num_seqs=engine.max_num_seqs,
                                 max_model_len=self.max_model_len, trust_remote_code=engine.trust_remote_code,
                                 kv_cache_bytes=kv_cache_bytes, enforce_eager=not engine.compile)
        # From here on, what was made is undone if a later step fails.
        self.vllm = self.table = self.loop = self.classifier = None
        self._owns_classifier = False
        try:
            if self.probe is not None:
                classifier = setup.classifier
                if classifier == DEFAULT or isinstance(classifier, (str, Path)):
                    # The default is the model-agnostic encoder: the embedded model's state reader needs
                    # the native engine's taps, which vLLM's scoring path does not hand over.
                    directory = resolve_classifier_dir(None if classifier == DEFAULT else classifier, log=self.log)
                    if directory is not None and is_reader_dir(directory):
                        raise OcEngineError(VLLM_NO_READER)
                    # A worker thread: vLLM's loop runs in other processes and never drains an inline queue.
                    self.classifier = None if directory is None else ExchangeClassifier(directory, inline=False)
                    self._owns_classifier = self.classifier is not None
                else:
                    if getattr(classifier, "reads_states", False):
                        raise OcEngineError(VLLM_NO_READER)
                    self.classifier = classifier
                self.table = ScoreTable.create(engine.max_num_seqs * ROWS_PER_SLOT, self.max_model_len)
            self.loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self.loop.run_forever, name="oc-engine-vllm", daemon=True)
            self._thread.start()
            self._call(self._start())
        except BaseException:
            self.close()
            raise

    # -- the public API (any thread) ----------------------------------------------------
    def generate(self, prompts, params: SamplingParams | list[SamplingParams] | None = None) -> list:
        """As `oc_engine.LLM.generate`: completions in the prompts' order (final check on)."""
        return [seq.completion for seq in self.run(prompts, params)]

    def run(self, prompts, params: SamplingParams | list[SamplingParams] | None = None, *,
            guard: GuardConfig | None | str = DEFAULT) -> list:
        """`generate`, returning the finished `Sequence`s (their per-token scores and EMA).
        guard: as `prepare_request` (None: unguarded, the probe still scores every token)."""
        seqs = self._sequences(prompts, params, keep_events=False, streaming=False, guard=guard)
        futures = [asyncio.run_coroutine_threadsafe(self.run_request(seq, _ignore), self.loop) for seq in seqs]
        try:
            cf.wait(futures)
        finally:
            for future in futures:
                future.cancel()  # a caller interrupted: the requests stop, nothing more is released
        return [future.result() for future in futures]

    def stream(self, prompt, params: SamplingParams | None = None, *, trace: bool = False):
        """As `oc_engine.LLM.stream`: the request's events as they happen, `Finished` last
        (`trace`: a `TokenScored` per token too); leaving the loop early cancels the request."""
        import queue

        (seq,) = self._sequences([prompt], params, keep_events=True, trace=trace)
        inbox: queue.SimpleQueue = queue.SimpleQueue()
        future = asyncio.run_coroutine_threadsafe(self.run_request(seq, lambda _s, events: inbox.put(events)),
                                                  self.loop)
        try:
            while True:
                try:
                    events = inbox.get(timeout=0.1)
                except queue.Empty:
                    if future.done():
                        future.result()  # raises what stopped it
                    continue
                yield from events
                if any(isinstance(e, Finished) for e in events):
                    return
        finally:
            future.cancel()

    def warm_up(self) -> None:
        """vLLM compiled and warmed itself at start; this starts the classifier and runs a greedy
        and a sampled request through the whole path."""
        self.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True))
        self.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0, seed=0))

    def async_engine(self, observers=()):
        from oc_engine_vllm.async_engine import VllmAsyncEngine

        return VllmAsyncEngine(self, observers)

    @staticmethod
    def check_config(config: EngineConfig) -> None:
        """What of `EngineConfig` vLLM cannot take: checked before a server starts."""
        if config.quantize is not None:
            raise OcEngineError("quantize is the native engine's; with the vLLM backend, give vLLM a quantized "
                                "checkpoint")
        if config.device != "auto":
            raise OcEngineError("device is the native engine's; vLLM runs on the platform it was installed for")

    # -- the `Engine` interface: what front ends read -------------------------------------
    @property
    def capacity(self) -> int:
        return self.config.max_num_seqs

    @property
    def vocab_size(self) -> int:
        return self._vocab

    def close(self) -> None:
        """Stop vLLM (its processes), the loop, the classifier if this object made it, and
        remove the score table."""
        running = self.loop is not None and self.loop.is_running()
        if self.vllm is not None and running:
            self._call(self._shutdown())  # on its loop: its output handler is a task there
        if running:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if self._owns_classifier and self.classifier is not None:
            self.classifier.close()
            self._owns_classifier = False
        if self.table is not None:
            self.table.close(unlink=True)
            self.table = None

    def __enter__(self) -> "VllmLLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- on the loop ----------------------------------------------------------------------
    async def run_request(self, seq, emit):
        """Drive one prepared request to its end (on this object's loop); returns it finished."""
        from oc_engine_vllm.request_driver import drive

        await drive(self, seq, emit)
        return seq

    def vllm_params(self, seq, row: int, tag: int):
        from vllm import SamplingParams as VllmParams
        from vllm.sampling_params import RequestOutputKind

        p = seq.params
        extra = None
        if self.probe is not None:
            c = self.probe.config
            extra = {"oc_engine": {"table": self.table.path, "row": row, "tag": tag, "alpha": float(c.alpha),
                                   "warn": float(c.warn), "pause": float(c.pause), "eos": min(self.eos_ids)}}
        return VllmParams(max_tokens=seq.limit, temperature=p.temperature, top_p=p.top_p or 1.0,
                          top_k=p.top_k or 0, seed=p.seed, ignore_eos=p.ignore_eos,
                          stop_token_ids=[] if p.ignore_eos else sorted(self.eos_ids), detokenize=False,
                          output_kind=RequestOutputKind.DELTA, extra_args=extra)

    def next_tag(self) -> int:
        return next(self._tags)

    # -- internals ------------------------------------------------------------------------
    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self.loop).result()

    async def _start(self) -> None:
        from vllm.v1.engine.async_llm import AsyncLLM

        self.rows = RowPool(self.capacity * ROWS_PER_SLOT)
        try:
            self.vllm = AsyncLLM.from_engine_args(self._args)
        except Exception as exc:  # noqa: BLE001 - vLLM's start-up errors are many types; one line each
            raise OcEngineError(f"vLLM could not start: {_root_cause(exc)}") from exc

    async def _shutdown(self) -> None:
        vllm, self.vllm = self.vllm, None
        vllm.shutdown()


def engine_args(model_dir: str, config, *, probe_dir: Path | None, dtype: str, max_num_seqs: int,
                max_model_len: int, trust_remote_code: bool = False, kv_cache_bytes: int | None = None,
                enforce_eager: bool = False):
    """vLLM's `AsyncEngineArgs`: with a probe, the probe-augmented architecture (`hf_overrides`)
    and the logits processor; scheduling kept synchronous (the processor reads each request's
    output tokens as of the step it samples)."""
    from vllm.engine.arg_utils import AsyncEngineArgs

    from oc_engine_vllm.plugin import ARCHITECTURES

    overrides, processors = {}, None
    if probe_dir is not None:
        overrides = {"architectures": [ARCHITECTURES[config.architectures[0]]], "oc_engine_probe": str(probe_dir)}
        processors = [LOGITS_PROCESSOR]
    if kv_cache_bytes is None:
        kv_cache_bytes = _kv_cache_bytes(config, max_num_seqs, max_model_len, dtype)
    return AsyncEngineArgs(model=model_dir, tokenizer=model_dir, dtype=dtype, max_model_len=max_model_len,
                           max_num_seqs=max_num_seqs, trust_remote_code=trust_remote_code, hf_overrides=overrides,
                           logits_processors=processors, kv_cache_memory_bytes=kv_cache_bytes,
                           enforce_eager=enforce_eager, async_scheduling=False, disable_log_stats=True)


def _ignore(_seq, _events) -> None:
    pass


def _kv_cache_bytes(config, slots: int, max_len: int, dtype: str) -> int:
    """Room for `slots` requests of `max_len` tokens, twice over (vLLM's blocks round up)."""
    text = config.get_text_config()
    heads = int(getattr(text, "num_key_value_heads", None) or text.num_attention_heads)
    head_dim = int(getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads)
    width = 4 if dtype == "float32" or (dtype == "auto" and str(getattr(text, "dtype", "")) in ("float32",
                                                                                              "torch.float32")) else 2
    per_token = 2 * int(text.num_hidden_layers) * heads * head_dim * width
    return max(64 << 20, 2 * slots * max_len * per_token)


def _root_cause(exc: BaseException) -> str:
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return f"{type(exc).__name__}: {exc}"


def embedding_fingerprint(model_dir: str, config, architecture: str):
    """The model's fingerprint from its safetensors files (the input embedding alone), so a probe
    made for another model is refused here in one line, before vLLM starts."""
    from safetensors import safe_open

    from oc_engine.guard.probe import ModelFingerprint

    directory = Path(model_dir)
    index = directory / "model.safetensors.index.json"
    names = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "embed_tokens.weight")
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        found = [(name, directory / weight_map[name]) for name in names if name in weight_map]
    else:
        found = [(name, directory / "model.safetensors") for name in names]
    for name, file in found:
        if not file.is_file():
            continue
        with safe_open(str(file), framework="pt") as handle:
            if name in handle.keys():
                return ModelFingerprint.from_parts(architecture, config.get_text_config(), handle.get_tensor(name))
    raise OcEngineError(f"{model_dir}: no input embedding found in its safetensors files")
