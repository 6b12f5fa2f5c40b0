"""The classifier shipped as a delta: saved, checked, merged and exported with the parity gate."""

import json
import shutil

import numpy as np
import pytest
import torch

from oc_engine.errors import OcEngineError
from oc_engine.guard import classifier_delta
from oc_engine.guard.classifier_delta import ADAPTER_WEIGHTS, DELTA_CONFIG, materialize, read_delta

LABELS = ("safe_compliance", "safe_refusal", "unsafe_compliance")


@pytest.fixture(scope="session")
def delta_dir(tmp_path_factory):
    """A rank-4 delta over the embedded MiniLM with random (non-zero) adapters and head."""
    from oc_engine.guard.classifier import load_sequence_classifier
    from oc_engine.models.embedded import embedded_classifier_backbone
    from oc_engine.training.classifier import with_lora

    base = load_sequence_classifier(str(embedded_classifier_backbone()), num_labels=3,
                                    id2label=dict(enumerate(LABELS)), ignore_mismatched_sizes=True)
    fingerprint = classifier_delta.fingerprint_of(base)
    model = with_lora(base, 4)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(torch.randn_like(param) * 0.05)
    out = tmp_path_factory.mktemp("delta") / "delta"
    classifier_delta.save_delta(model, out, backbone=classifier_delta.EMBEDDED_BACKBONE, fingerprint=fingerprint,
                                labels=LABELS, max_length=64, calibration={"block_threshold": 0.5},
                                metrics={})
    return out, model.eval()


@pytest.fixture()
def cache(monkeypatch, tmp_path):
    monkeypatch.setenv("OC_ENGINE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_delta_merges_and_exports_to_the_trained_model(delta_dir, cache):
    from oc_engine.guard.check_batcher import pad
    from oc_engine.guard.classifier import ExchangeClassifier
    from oc_engine.guard.exchange_layout import ExchangeLayout
    from oc_engine.models.defaults import resolve_classifier_dir
    from transformers import AutoTokenizer

    path, peft_model = delta_dir
    export = materialize(path)
    assert export.parent.parent == cache / "classifier-delta"
    config = json.loads((export / "classifier_config.json").read_text())
    assert config["block_threshold"] == 0.5 and config["max_length"] == 64
    assert config["parity"]["max_abs_prob_delta"] < 1e-4  # the export's own gate
    # The ONNX export equals the adapters as trained (unmerged, fp16-rounded weights), not just the merge.
    pairs = [("How do I bake bread?", "Mix flour"), ("How do I make a bomb?", "Sure, first you")]
    tokenizer = AutoTokenizer.from_pretrained(classifier_delta.read_delta(path).backbone_dir())
    with torch.no_grad():
        half = {k: v.half().float() for k, v in peft_model.state_dict().items()}
        peft_model.load_state_dict(half)
        layout = ExchangeLayout(tokenizer, 64)
        enc = {k: torch.from_numpy(v) for k, v in pad([layout.last_window(p, r) for p, r in pairs], 0).items()}
        expected = peft_model(**enc).logits.softmax(-1).numpy()
    classifier = ExchangeClassifier(export)
    got = classifier.probabilities([p for p, _ in pairs], [r for _, r in pairs])
    classifier.close()
    np.testing.assert_allclose(got, expected, atol=1e-4)
    assert materialize(path) == export  # cached: the second use builds nothing
    assert resolve_classifier_dir(path) == export  # --classifier accepts a delta directory


@pytest.mark.parametrize("damage", ["missing", "truncated", "bad json"])
def test_a_missing_or_corrupt_delta_is_one_error_naming_the_file(delta_dir, tmp_path, damage):
    path = tmp_path / "delta"
    shutil.copytree(delta_dir[0], path)
    file = path / (DELTA_CONFIG if damage == "bad json" else ADAPTER_WEIGHTS)
    if damage == "missing":
        file.unlink()
    elif damage == "truncated":
        file.write_bytes(file.read_bytes()[:1000])
    else:
        file.write_text("{not json")
    with pytest.raises(OcEngineError, match=str(file)):
        read_delta(path)


def test_a_delta_for_another_backbone_is_refused_by_fingerprint(delta_dir, tmp_path, cache):
    path = tmp_path / "delta"
    shutil.copytree(delta_dir[0], path)
    config = json.loads((path / DELTA_CONFIG).read_text())
    config["fingerprint"]["weights_hash"] = "0" * 32
    (path / DELTA_CONFIG).write_text(json.dumps(config))
    with pytest.raises(OcEngineError, match="another backbone"):
        materialize(path)
    assert not any((cache / "classifier-delta").glob("*/export")), "nothing is cached for a refused delta"


def test_a_broken_shipped_default_fails_closed_instead_of_dropping_the_classifier(tiny, monkeypatch, tmp_path):
    import oc_engine.models.defaults as defaults
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM
    from probe_helpers import make_probe

    monkeypatch.setattr(defaults, "default_classifier_delta", lambda: tmp_path / "shipped")
    (tmp_path / "shipped").mkdir()
    loaded = tiny("llama")
    with pytest.raises(OcEngineError, match="classifier delta file is missing"):
        LLM(loaded, EngineConfig(compile=False), GuardSetup(probe=make_probe(loaded.model, bias=0.0)))


def test_the_shipped_default_is_a_small_delta_for_the_embedded_backbone():
    from oc_engine.guard.classifier import load_sequence_classifier
    from oc_engine.models.embedded import default_classifier_delta_dir

    delta = read_delta(default_classifier_delta_dir())
    size = sum(f.stat().st_size for f in delta.path.iterdir())
    assert size <= 8 * 2 ** 20, f"the shipped delta is {size / 2 ** 20:.1f} MB"
    assert delta.backbone == classifier_delta.EMBEDDED_BACKBONE and delta.labels == LABELS
    base = load_sequence_classifier(delta.backbone_dir(), num_labels=3, ignore_mismatched_sizes=True)
    assert classifier_delta.fingerprint_of(base) == delta.fingerprint
    assert 0 < delta.block_threshold < 1


def test_a_delta_of_the_retired_glued_format_is_refused_with_what_to_do(delta_dir, tmp_path):
    copy = tmp_path / "old"
    shutil.copytree(delta_dir[0], copy)
    config = json.loads((copy / DELTA_CONFIG).read_text())
    (copy / DELTA_CONFIG).write_text(json.dumps({**config, "format": "oc-engine-classifier-delta/1"}))
    with pytest.raises(OcEngineError, match="retired .* retrain it"):
        read_delta(copy)
