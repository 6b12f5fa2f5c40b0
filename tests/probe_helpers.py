"""Probes for the tiny test models, and a fake classifier with controllable verdicts."""

import concurrent.futures as cf
import time

import torch

from oc_engine.guard.probe import ModelFingerprint, Probe, ProbeConfig


def make_probe(model, bias: float, layers=(-2,), seed: int = 0, **settings) -> Probe:
    fingerprint = ModelFingerprint.of(model)
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(len(layers), fingerprint.hidden_size, generator=g) * 0.05
    config = ProbeConfig(model=fingerprint, layers=tuple(layers), hidden_size=fingerprint.hidden_size, **settings)
    return Probe(config=config, weight=weight, bias=torch.tensor([bias]))


class FakeClassifier:
    def __init__(self, verdict="allow", delay=0.0, error: Exception | None = None):
        self.verdict, self.delay, self.error = verdict, delay, error
        self.calls: list[str] = []
        self.urgent: list[bool] = []
        self.pool = cf.ThreadPoolExecutor(max_workers=1)

    def submit(self, prompt, response, urgent=False, judged_chars=0):
        self.calls.append(response)
        self.urgent.append(urgent)
        # The verdict is the one set when the check is submitted: a subclass that sets it per
        # prompt must not see a later submit's choice (two prompts prefilled together submit
        # back to back, before the worker thread runs the first).
        return self.pool.submit(self._run, self.verdict)

    def _run(self, verdict):
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return {"verdict": verdict, "p_unsafe": 0.9 if verdict == "block" else 0.1}


def plain_llm(loaded, compile=False, *, max_num_seqs=4, max_model_len=128, prefill_chunk=256, **debug):
    """An unguarded LLM over a loaded (tiny) model; `debug`: DebugOptions' fields."""
    from oc_engine.config import UNGUARDED, DebugOptions, EngineConfig
    from oc_engine.llm import LLM

    config = EngineConfig(compile=compile, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                          prefill_chunk=prefill_chunk)
    return LLM(loaded, config, UNGUARDED, debug=DebugOptions(**debug))


def monitored(tokenizer, prompt: str, config, classifier, **kwargs):
    """A SequenceMonitor over a fresh Sequence, outside any engine: `feed` gives it tokens."""
    from oc_engine.engine.sequence import Sequence
    from oc_engine.engine.text_stream import TextStream
    from oc_engine.guard.monitor import SequenceMonitor
    from oc_engine.params import SamplingParams

    seq = Sequence(request_id="0", prompt_ids=[1], params=SamplingParams(max_tokens=10_000, ignore_eos=True), key=0,
                   limit=10_000, stream=TextStream(tokenizer))
    seq.guard = SequenceMonitor(seq, prompt, config, classifier, **kwargs)
    return seq.guard


def feed(monitor, token: int, score, ema, flags: int) -> None:
    """What the engine does with one scored token: append it to the sequence, then tell its guard."""
    monitor.seq.append_token(token, is_eos=False)
    monitor.on_token(token, score, ema, flags)


def fixed(max_tokens: int, **params):
    from oc_engine.params import SamplingParams

    params.setdefault("ignore_eos", True)
    return SamplingParams(max_tokens=max_tokens, **params)


def guarded_run(loaded, probe, classifier, prompts, params, *, compile=False, output_lag=None, collect_taps=False,
                max_num_seqs=4, **guard):
    """Generate through an LLM guarded by `probe` and `classifier`; returns (sequences, shown):
    shown[i] is what the user of request i saw, in order (released text, then any refusal)."""
    from oc_engine.config import DebugOptions, EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM
    from oc_engine.outputs import Refused, TextReleased

    llm = LLM(loaded, EngineConfig(compile=compile, max_num_seqs=max_num_seqs, max_model_len=128),
              GuardSetup(probe=probe, classifier=classifier, policy=GuardConfig(**guard)),
              debug=DebugOptions(output_lag=output_lag))
    shown: dict[str, str] = {}

    def on_event(event):
        if isinstance(event, (TextReleased, Refused)):
            shown[event.request_id] = shown.get(event.request_id, "") + event.text

    seqs = llm.run(prompts, params, collect_taps=collect_taps, on_event=on_event)
    return seqs, [shown.get(s.request_id, "") for s in seqs]


def summary(monitor) -> dict:
    """A SequenceMonitor's outcome as plain values: released_text is what the user saw (the
    released text, then the refusal if any)."""
    report = monitor.report()
    return {"status": report.status, "reason": report.reason, "released_text": monitor.text + (monitor.refusal or ""),
            "pause_points": list(report.pause_points), "verdicts": [vars(v) for v in report.verdicts]}
