"""pytest-benchmark: one classifier call (batch 1) at 128 and 512 tokens, ONNX Runtime vs PyTorch, on CPU.

    uv run pytest bench/test_bench_classifier.py --benchmark-enable

Speed does not depend on weight values, so the embedded all-MiniLM-L6-v2 with a fresh
three-class head stands in for a trained classifier. `oc-engine bench classifier`
measures a real export the same way and writes JSON.
"""

import numpy as np
import onnxruntime as ort
import pytest
import torch

from oc_engine.bench.classifier import _encoded
from oc_engine.guard.classifier import model_inputs


@pytest.fixture(scope="module")
def minilm(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from oc_engine.export.onnx_export import ExportOptions, export_classifier
    from oc_engine.models.embedded import embedded_classifier_backbone

    root = tmp_path_factory.mktemp("minilm")
    labels = {0: "safe_compliance", 1: "safe_refusal", 2: "unsafe_compliance"}
    model = AutoModelForSequenceClassification.from_pretrained(embedded_classifier_backbone(), num_labels=3,
                                                               id2label=labels, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(embedded_classifier_backbone())
    model.save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    for precision in ("fp32", "int8"):
        export_classifier(root / "hf", root / precision, ExportOptions(precision=precision))
    return model, tokenizer, root


@pytest.mark.parametrize("tokens", [128, 512])
@pytest.mark.parametrize("backend", ["onnxruntime-fp32", "onnxruntime-int8", "pytorch-fp32"])
def test_classifier_call(benchmark, minilm, backend, tokens):
    model, tokenizer, root = minilm
    enc = _encoded(tokenizer, tokens)
    if backend.startswith("onnxruntime"):
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1  # as the guard's worker runs it
        session = ort.InferenceSession(str(root / backend.split("-")[1] / "model.onnx"), options,
                                       providers=["CPUExecutionProvider"])
        feeds = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
        call = lambda: session.run(["logits"], feeds)  # noqa: E731
    else:
        inputs = {k: torch.from_numpy(v) for k, v in model_inputs(model, enc).items()}

        def call():
            with torch.inference_mode():
                return model(**inputs)
    call()
    benchmark.pedantic(call, rounds=20, iterations=1, warmup_rounds=2)
