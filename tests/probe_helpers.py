"""Probes for the tiny test models, and a fake classifier with controllable verdicts."""

import concurrent.futures as cf
import time

import torch

from oc_engine.engine.probe import ModelFingerprint, Probe, ProbeConfig


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

    def submit(self, prompt, response, urgent=False):
        self.calls.append(response)
        self.urgent.append(urgent)
        return self.pool.submit(self._run)

    def _run(self):
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return {"verdict": self.verdict, "p_unsafe": 0.9 if self.verdict == "block" else 0.1}
