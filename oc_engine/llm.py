"""The public API: one `LLM` loads a model (and its guard) once and serves requests.

    from oc_engine import LLM, EngineConfig, GuardSetup, SamplingParams

    llm = LLM()                                   # the embedded model with its default guard
    llm = LLM("org/model", EngineConfig(dtype="bfloat16"), GuardSetup(probe="probe-dir/"))
    for c in llm.generate(["Write a haiku", "Explain DNS"], SamplingParams(max_tokens=64)):
        print(c.text, c.finish_reason, c.guard.status)
    for event in llm.stream("Explain SQL injection"):   # TextReleased, Paused, VerdictReceived, ...
        ...

Requests are decoded together with continuous batching: `config.max_num_seqs` cache slots, a
request joining a free slot between decode steps and leaving it the moment it ends. A prompt
is text (the user turn of the chat template), token ids, or a list of chat messages. Callers
that drive the loop themselves use `add_request` (or `prepare_request`, then `add_request`),
`step`, `cancel` and `wake`; `oc_engine.async_llm.AsyncLLM` does that on a thread for asyncio.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from pathlib import Path
from typing import Callable, Iterator, Sequence as Seq

from oc_engine.config import DEFAULT, DebugOptions, EngineConfig, GuardSetup
from oc_engine.engine.requests import PreparesRequests, Prompt
from oc_engine.engine.sequence import FINISHED, WAITING, Sequence
from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import GuardConfig
from oc_engine.outputs import Completion, Event
from oc_engine.params import SamplingParams

CACHE_BUCKET = 128  # `fit` rounds cache lengths up to this, so nearby jobs share compiled steps


class LLM(PreparesRequests):
    """model: a hub id, a local Hugging Face directory, a .gguf file, or None for the embedded
    SmolLM2-135M-Instruct (a `LoadedModel` is accepted too).
    config: how the model is loaded and run (`EngineConfig`; default: its defaults).
    guard: what guards it (`GuardSetup`: probe, classifier, policy; default: the shipped guard
    with the embedded model, none with another). `UNGUARDED` is plain generation. A probe made
    on the unquantized model is accepted under `quantize` only if it was re-validated on that
    quantization (`oc-engine revalidate-probe`).
    debug: `DebugOptions` for tools and tests.
    log: called with one-line notices (which defaults were chosen)."""

    def __init__(self, model=None, config: EngineConfig | None = None, guard: GuardSetup | None = None, *,
                 debug: DebugOptions | None = None, log: Callable[[str], None] | None = None):
        from oc_engine.engine.model_runner import ModelRunner
        from oc_engine.guard.probe import Probe, load_probe
        from oc_engine.guard.state_reader import check_state_reader
        from oc_engine.models.defaults import resolve_classifier, resolve_probe_dir
        from oc_engine.models.loading import LoadedModel, load_model, resolve_device

        self.config = config = config if config is not None else EngineConfig()
        setup = guard if guard is not None else GuardSetup()
        debug = debug if debug is not None else DebugOptions()
        if not isinstance(config, EngineConfig) or not isinstance(setup, GuardSetup):
            raise OcEngineError("LLM(model, config, guard) takes an EngineConfig and a GuardSetup")
        self.log = log or (lambda message: None)
        if isinstance(model, LoadedModel) and config.quantize not in (None, model.quantization):
            raise OcEngineError(f"this LoadedModel is {model.quantization or 'not quantized'}: load it with "
                                f"load_model(..., quantize={config.quantize!r}) to run it {config.quantize}")
        probe = setup.probe
        if probe == DEFAULT:
            probe = resolve_probe_dir(None, model is None, self.log)
            if probe is None:  # said, never silent (the CLI refuses to start unguarded unless asked)
                self.log("no probe ships for this model: generation is UNGUARDED (give GuardSetup(probe=DIR))")
        if probe is not None and not isinstance(probe, Probe):
            probe = load_probe(probe)
        self.probe = probe
        if probe is None and setup.policy is not None:
            raise OcEngineError("a guard policy needs a probe")
        self.guard_config = (setup.policy or GuardConfig(every=probe.config.every)) if probe is not None else None
        self.record_trace = setup.record_trace
        self._owns_classifier = False
        self.classifier = None
        if probe is not None:
            classifier = setup.classifier
            # Resolved before the model loads: a bad classifier export fails in a second.
            if classifier == DEFAULT or isinstance(classifier, (str, Path)):
                target = None if classifier == DEFAULT else classifier
                device_name = str(model.device) if isinstance(model, LoadedModel) else str(resolve_device(config.device))
                self.classifier = resolve_classifier(target, device_name, log=self.log,
                                                     model_is_embedded=model is None,
                                                     quantized=config.quantize is not None)
                self._owns_classifier = self.classifier is not None
                if self.classifier is None:
                    self.log("no classifier: a pause blocks the answer")
            else:
                self.classifier = classifier
        try:
            self.loaded = model if isinstance(model, LoadedModel) else load_model(
                model, device=config.device, dtype=config.dtype, trust_remote_code=config.trust_remote_code,
                quantize=config.quantize)
            self.tokenizer = self.loaded.tokenizer
            text_config = self.loaded.model.config.get_text_config()
            self.context = int(getattr(text_config, "max_position_embeddings", 0) or 2 ** 31)
            self.max_model_len = config.model_len(self.context)
            self.chat_template = config.chat_template
            self.runner = ModelRunner(self.loaded, num_slots=config.max_num_seqs, max_model_len=self.max_model_len,
                                      compile=config.compile, probe=probe, tap=debug.tap,
                                      prefer_fused=debug.prefer_fused, output_lag=debug.output_lag,
                                      buckets=config.batch_buckets)
            check_state_reader(self.classifier, self.loaded.model, self.runner.taps, self.guard_config)
        except BaseException:
            self.close()
            raise
        from oc_engine.engine.llm_engine import LLMEngine

        generation = getattr(self.loaded.model, "generation_config", None)
        self.engine = LLMEngine(self.runner, eos_token_ids(generation, self.tokenizer),
                                run_checks=self._run_checks, prefill_chunk=config.prefill_chunk)
        self._ids = itertools.count()
        self._lock = threading.RLock()
        self._driven: dict[str, Sequence] = {}  # requests from add_request, whose events step() returns

    # -- generation ---------------------------------------------------------------------
    def generate(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None,
                 *, progress: Callable[[Completion], None] | None = None) -> list[Completion]:
        """Generate for each prompt (text, rendered with the chat template, or token ids); the
        completions come back in the prompts' order. `progress` is called as each one finishes."""
        return [seq.completion for seq in self.run(prompts, params, progress=progress)]

    def stream(self, prompt: Prompt, params: SamplingParams | None = None, *, trace: bool = False) -> Iterator[Event]:
        """The events of one request as they happen: `TextReleased`, `Paused`, `VerdictReceived`,
        `Refused`, and last `Finished` (with the Completion); with `trace` (guarded only) a
        `TokenScored` per token too. Other requests keep decoding meanwhile; leaving the loop
        early cancels the request."""
        (seq,) = self._sequences([prompt], params, keep_events=True, trace=trace)
        with contextlib.closing(self._drive([seq])) as steps:  # closed early: the request is cancelled
            for _, events, _ in steps:
                yield from events

    def add_request(self, prompt: Prompt | Sequence, params: SamplingParams | None = None, *,
                    request_id: str | None = None, stream: bool = True,
                    guard: GuardConfig | None | str = DEFAULT) -> str:
        """Queue a request (or one made by `prepare_request`) for `step()` to decode; returns its id."""
        seq = prompt if isinstance(prompt, Sequence) else self.prepare_request(
            prompt, params, request_id=request_id, stream=stream, guard=guard)
        with self._lock:
            if seq.request_id in self.engine.requests or seq.request_id in self._driven:
                raise OcEngineError(f"request id {seq.request_id!r} is already in use")
            if seq.status != WAITING or seq.token_ids:
                raise OcEngineError(f"request {seq.request_id!r} was already queued once")
            self.engine.add(seq)
            self._driven[seq.request_id] = seq
        return seq.request_id

    def step(self) -> list[Event]:
        """Run the engine once (admit, decode one token, deliver verdicts); returns the events of
        the requests queued with `add_request` since the last call."""
        with self._lock:
            if self.engine.has_unfinished():
                self.engine.step()
            events = []
            for request_id, seq in list(self._driven.items()):
                events += seq.take_events()
                if seq.status == FINISHED:
                    del self._driven[request_id]
            return events

    def cancel(self, request_id: str) -> bool:
        """Stop a request at once, releasing nothing more; its slot is freed. Cancelling an
        unknown or finished request changes nothing and returns False."""
        with self._lock:
            cancelled = self.engine.cancel(request_id)
        if not cancelled:
            self.log(f"cancel: no unfinished request {request_id!r}")
        return cancelled

    def has_unfinished(self) -> bool:
        return self.engine.has_unfinished()

    def wake(self) -> None:
        """From any thread: a `step()` blocked on verdicts returns early (new work is waiting)."""
        self.engine.wake()

    def run(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None, *,
            collect_taps: bool = False, progress: Callable[[Completion], None] | None = None,
            on_event: Callable[[Event], None] | None = None) -> list[Sequence]:
        """`generate`, returning the finished `Sequence`s (the per-token probe scores, EMA, taps
        with `collect_taps`, and the guard with its trace): for tools built on the engine.
        `on_event` receives every request's events as they happen."""
        seqs = self._sequences(prompts, params, keep_events=on_event is not None, collect_taps=collect_taps)
        with contextlib.closing(self._drive(seqs)) as steps:
            for seq, events, finished in steps:
                for event in events:
                    on_event(event)
                if finished and progress is not None:
                    progress(seq.completion)
        return seqs

    def fit(self, prompts: Prompt | Seq[Prompt], params: SamplingParams | Seq[SamplingParams] | None = None) -> int:
        """Before the first request: size the cache to these requests (the longest prompt plus its
        max_tokens, rounded up to 128, within the model's context) and return that length. Every
        step attends over the whole cache, so a one-off job decodes faster in a cache its size."""
        seqs = self._sequences(prompts, params, keep_events=False, check_length=False)
        need = max((len(s.prompt_ids) + s.params.max_tokens for s in seqs), default=2)
        length = min(-(-need // CACHE_BUCKET) * CACHE_BUCKET, self.context)
        with self._lock:
            self.runner.resize(length)
            self.max_model_len = length
        return length

    def set_probe(self, probe) -> None:
        """Swap in another probe for the same model and layers (new weights or thresholds). It is
        copied into the step's buffers, so nothing recompiles; requests added later use it."""
        from oc_engine.guard.probe import Probe

        if self.probe is None or not isinstance(probe, Probe):
            raise OcEngineError("set_probe needs a Probe, on an LLM built with one")
        if probe.config.layers != self.probe.config.layers or probe.weight.shape != self.probe.weight.shape:
            raise OcEngineError(f"set_probe: layers {probe.config.layers} and weight {tuple(probe.weight.shape)} "
                                f"must match the loaded probe's {self.probe.config.layers} and "
                                f"{tuple(self.probe.weight.shape)}")
        with self._lock:
            self.runner.probe.load(probe)
            self.probe = probe

    def warm_up(self) -> None:
        """Compile the greedy and the sampled decode steps of every batch bucket and start the
        classifier, so no first request pays for them (a non-streamed call's final check asks
        the classifier). Without it, the steps below `max_num_seqs` are never used."""
        self.runner.compile_buckets()
        self.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True))
        self.generate(["Hello"], SamplingParams(max_tokens=3, ignore_eos=True, temperature=1.0, seed=0))

    def async_engine(self, observers=()):
        """An `AsyncLLM` driving this LLM on its own thread (what the server runs); not started."""
        from oc_engine.async_llm import AsyncLLM

        return AsyncLLM(self, observers)

    # -- facts (the `Engine` interface: what front ends read) ------------------------------
    @property
    def capacity(self) -> int:
        """Requests decoded together (cache slots)."""
        return self.runner.num_slots

    @property
    def vocab_size(self) -> int:
        """Token ids below this are valid input (the output embedding's rows)."""
        return self.runner.vocab

    @property
    def num_running(self) -> int:
        """Requests holding a cache slot."""
        return self.engine.num_running

    @property
    def num_waiting(self) -> int:
        """Requests queued that hold no cache slot yet."""
        return self.engine.num_waiting

    @property
    def compile_ms(self) -> float:
        """Wall time spent compiling decode steps so far (not counted as decoding)."""
        return round(self.runner.compile_s * 1000, 3)

    def close(self) -> None:
        """Stop the classifier's worker if this LLM made it."""
        if self._owns_classifier and self.classifier is not None:
            with contextlib.suppress(Exception):
                self.classifier.close()
            self._owns_classifier = False

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ----------------------------------------------------------------------
    def _drive(self, seqs: list[Sequence]) -> Iterator[tuple[Sequence, list[Event], bool]]:
        """The loop over `engine.step` for callers on this thread (`stream`, `run`; `step` is
        the one for callers that drive it themselves): queue `seqs`, step while any is
        unfinished and none has events waiting, and yield (request, its new events, whether it
        just finished). Closed early, it cancels the unfinished ones."""
        with self._lock:
            for seq in seqs:
                self.engine.add(seq)
        unfinished = list(seqs)
        try:
            while unfinished:
                with self._lock:
                    if not any(seq.events for seq in unfinished):
                        self.engine.step()
                    batch = [(seq, seq.take_events(), seq.status == FINISHED) for seq in unfinished]
                for seq, events, finished in batch:
                    if finished:
                        unfinished.remove(seq)
                    if events or finished:
                        yield seq, events, finished
        finally:
            with self._lock:
                for seq in unfinished:
                    self.engine.cancel(seq.request_id)

    def _run_checks(self) -> None:
        """The loop's call between steps: an inline classifier runs its queued checks (looked up
        each time: tools swap `classifier` on a built LLM)."""
        drain = getattr(self.classifier, "drain", None)
        if drain is not None:
            drain()


def eos_token_ids(generation_config, tokenizer) -> set[int]:
    """The generation config's end-of-sequence ids (None: no config) and the tokenizer's."""
    ids = set()
    eos = getattr(generation_config, "eos_token_id", None)
    for value in (eos if isinstance(eos, list) else [eos]):
        if value is not None:
            ids.add(int(value))
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
