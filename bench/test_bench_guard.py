"""pytest-benchmark: 128 tokens at batch 1 unguarded, with the probe, and with forced escalations.

    uv run pytest bench/test_bench_guard.py --benchmark-enable

The classifier is the embedded all-MiniLM-L6-v2 with a fresh head (speed does not depend on
weights) and its verdicts are forced to allow. `oc-engine bench guard` reports the
same modes with inter-token gaps.
"""

import pytest
import torch

from oc_engine.bench.guard import GUARD_BENCH_MODES, run_guard_bench


@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from oc_engine.export.onnx_export import export_classifier
    from oc_engine.guard.classifier import ExchangeClassifier
    from oc_engine.models.embedded import embedded_classifier_backbone

    root = tmp_path_factory.mktemp("minilm")
    labels = ("safe_compliance", "safe_refusal", "unsafe_compliance")
    model = AutoModelForSequenceClassification.from_pretrained(
        embedded_classifier_backbone(), num_labels=3, attn_implementation="sdpa",
        id2label=dict(enumerate(labels)), label2id={name: i for i, name in enumerate(labels)})
    model.save_pretrained(root / "hf")
    AutoTokenizer.from_pretrained(embedded_classifier_backbone()).save_pretrained(root / "hf")
    export_classifier(root / "hf", root / "onnx")
    return ExchangeClassifier(root / "onnx")


def test_guard_modes(benchmark, embedded, classifier):
    loaded, _ = embedded
    report = benchmark.pedantic(lambda: run_guard_bench(loaded, classifier, new_tokens=128, repeats=3),
                                rounds=1, iterations=1)
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == list(GUARD_BENCH_MODES)
    assert rows["escalating"]["checks"] >= 2
    benchmark.extra_info.update({m: round(r["tokens_per_s"], 1) for m, r in rows.items()})
