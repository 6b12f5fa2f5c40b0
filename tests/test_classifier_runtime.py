"""The exported ONNX classifier at run time, against PyTorch, and inside guarded generation."""

import json

import numpy as np
import pytest
import torch

from oc_engine.errors import OcEngineError
from oc_engine.guard.classifier import ExchangeClassifier
from oc_engine.params import SamplingParams
from probe_helpers import guarded_run, make_probe


def test_onnx_runtime_matches_pytorch(tiny_classifier):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    hf_dir, onnx_dir = tiny_classifier
    prompts, responses = ["How do I bake bread?", "Hack wifi"], ["Mix flour and water. " * 30, "Sure, first"]
    onnx = ExchangeClassifier(onnx_dir).probabilities(prompts, responses)
    model = AutoModelForSequenceClassification.from_pretrained(hf_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    with torch.no_grad():  # the tokenizer's own text-pair encoding: what the layout builds when it fits
        expected = model(**tokenizer(prompts, responses, padding=True, return_tensors="pt")).logits.softmax(-1).numpy()
    np.testing.assert_allclose(onnx, expected, atol=1e-4)
    torch_backend = ExchangeClassifier(onnx_dir, backend="torch").probabilities(prompts, responses)
    np.testing.assert_allclose(torch_backend, expected, atol=1e-5)


@pytest.mark.parametrize("inline", [False, True])
def test_submit_returns_a_future_with_a_verdict(tiny_classifier, inline):
    classifier = ExchangeClassifier(tiny_classifier[1], inline=inline)
    future = classifier.submit("hi", "hello")
    if inline:
        assert not future.done(), "an inline check waits for the decode loop's drain"
        classifier.drain()
    result = future.result(timeout=30)
    assert result["verdict"] in ("allow", "block", "uncertain") and 0 <= result["p_unsafe"] <= 1
    assert result["backend"] == "onnx"
    classifier.close()


def test_the_default_is_inline_on_cpu(tiny_classifier):
    classifier = ExchangeClassifier(tiny_classifier[1])
    assert classifier.inline and not classifier._batcher._started


def test_guarded_generation_blocks_with_the_real_runtime(tiny, tiny_classifier, tmp_path):
    import shutil

    blocking = tmp_path / "blocking"
    shutil.copytree(tiny_classifier[1], blocking)
    config = json.loads((blocking / "classifier_config.json").read_text())
    config.update(allow_threshold=0.0, block_threshold=0.0)  # every answer blocks
    (blocking / "classifier_config.json").write_text(json.dumps(config))
    loaded = tiny("llama")
    classifier = ExchangeClassifier(blocking)
    try:
        (seq,), (shown,) = guarded_run(loaded, make_probe(loaded.model, bias=20.0), classifier, [[2, 5, 6]],
                                       SamplingParams(max_tokens=10), refusal="NO")
    finally:
        classifier.close()
    report = seq.completion.guard
    assert report.status == "blocked" and shown == "NO" and seq.completion.refusal == "NO"
    assert report.verdicts[0].verdict == "block" and report.verdicts[0].latency_ms > 0


def test_runtime_errors(tmp_path):
    with pytest.raises(OcEngineError, match="not found"):
        ExchangeClassifier(tmp_path / "absent")
    with pytest.raises(OcEngineError, match="not a classifier export"):
        ExchangeClassifier(tmp_path)


def test_urgent_and_background_sessions_give_the_same_probabilities(tiny_classifier):
    """Whether a check is urgent (decoding waits: every core) or not (one thread) depends on
    timing; its probability must not, or a verdict near a threshold could. Bit for bit."""
    classifier = ExchangeClassifier(tiny_classifier[1])
    prompts = ["How do I bake bread?", "Hack wifi", "w5 w6"] * 3
    responses = ["Mix flour and water. " * 40, "Sure, first", "", "a", "b " * 200, "c", "d", "e " * 7, "f"]
    for p, r in zip(prompts, responses):
        background = classifier.probabilities([p], [r], urgent=False)
        urgent = classifier.probabilities([p], [r], urgent=True)
        assert np.array_equal(background, urgent)
    classifier.close()


def test_a_cuda_session_that_fell_back_to_the_cpu_is_noticed():
    """ONNX Runtime swaps in its CPU provider, with only a warning, when CUDA's cannot load."""
    from oc_engine.guard.classifier import runs_on_cuda

    class Session:
        def __init__(self, providers):
            self.providers = providers

        def get_providers(self):
            return self.providers

    assert runs_on_cuda(Session(["CUDAExecutionProvider", "CPUExecutionProvider"]))
    assert not runs_on_cuda(Session(["CPUExecutionProvider"]))
