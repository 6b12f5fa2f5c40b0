"""export-classifier: parity with PyTorch (BERT, ModernBERT with sliding windows, int8), and errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from oc_engine.errors import OcEngineError
from oc_engine.export.onnx_export import ExportOptions, export_classifier
from oc_engine.guard.classifier import ExchangeClassifier, model_inputs

LABELS = {0: "safe_compliance", 1: "safe_refusal", 2: "unsafe_compliance"}


@pytest.fixture(scope="module")
def tiny_modernbert(tmp_path_factory):
    """A tiny random ModernBERT whose local attention window (32 tokens) is far below 600."""
    from transformers import AutoTokenizer, ModernBertConfig, ModernBertForSequenceClassification

    from oc_engine.models.embedded import embedded_classifier_backbone

    root = tmp_path_factory.mktemp("modernbert")
    tokenizer = AutoTokenizer.from_pretrained(embedded_classifier_backbone())
    torch.manual_seed(0)
    config = ModernBertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                              num_hidden_layers=3, num_attention_heads=2, local_attention=32,
                              global_attn_every_n_layers=3, max_position_embeddings=1024, num_labels=3,
                              id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                              pad_token_id=tokenizer.pad_token_id, cls_token_id=tokenizer.cls_token_id,
                              sep_token_id=tokenizer.sep_token_id, bos_token_id=tokenizer.cls_token_id,
                              eos_token_id=tokenizer.sep_token_id)
    model = ModernBertForSequenceClassification(config)
    model.save_pretrained(root / "hf")
    tokenizer.model_max_length = 1024
    tokenizer.save_pretrained(root / "hf")
    return root / "hf"


def _torch_probabilities(hf_dir, prompts, responses):
    """PyTorch's probabilities for these exchanges as the tokenizer's own text pairs (they fit)."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(hf_dir, attn_implementation="sdpa").eval()
    tokenizer = AutoTokenizer.from_pretrained(hf_dir)
    enc = model_inputs(model, tokenizer(prompts, responses, padding=True, return_tensors="pt"))
    with torch.no_grad():
        return model(**enc).logits.softmax(-1).numpy(), enc["input_ids"].shape[1]


def test_modernbert_sliding_window_survives_export_at_600_tokens(tiny_modernbert, tmp_path):
    config = export_classifier(tiny_modernbert, tmp_path / "onnx", ExportOptions(max_length=1024))
    assert config["parity"]["longest_tokens"] >= 600
    assert config["parity"]["max_abs_prob_delta"] <= 1e-4
    words = " ".join(f"word{i % 50}" for i in range(400))
    prompts, responses = ["Tell me a long story", "hi"], [words, "hello there"]
    expected, length = _torch_probabilities(tiny_modernbert, prompts, responses)
    assert length >= 600  # longer than the 32-token window, many times over
    got = ExchangeClassifier(tmp_path / "onnx").probabilities(prompts, responses)
    np.testing.assert_allclose(got, expected, atol=1e-4)


def test_bert_export_is_optimized_and_matches(tiny_classifier):
    config = json.loads((tiny_classifier[1] / "classifier_config.json").read_text())
    assert config["optimizer"]["optimizer"].startswith("onnxruntime.transformers")
    assert config["parity"]["max_abs_prob_delta"] <= 1e-4 and config["parity"]["label_flips"] == 0
    assert config["labels"][config["unsafe_label"]] == "unsafe_compliance"


@pytest.mark.parametrize("precision", ["int8", "fp16"])
def test_reduced_precision_exports_are_within_their_tolerance(tiny_classifier, tmp_path, precision):
    config = export_classifier(tiny_classifier[0], tmp_path / precision, ExportOptions(precision=precision))
    assert config["precision"] == precision and config["parity"]["max_abs_prob_delta"] <= 2e-2
    assert (tmp_path / precision / "model.onnx").stat().st_size < (tiny_classifier[1] / "model.onnx").stat().st_size
    verdict = ExchangeClassifier(tmp_path / precision).judge("hi", "hello")["verdict"]
    assert verdict in ("allow", "block", "uncertain")


def test_a_failed_parity_check_writes_nothing(tiny_classifier, tmp_path):
    with pytest.raises(OcEngineError, match=r"parity check failed .* max \|delta probability\|"):
        export_classifier(tiny_classifier[0], tmp_path / "new" / "deeper" / "strict", ExportOptions(tolerance=-1.0))
    assert list(tmp_path.iterdir()) == []  # not even the parents made for OUT


def test_input_errors_are_one_line_and_write_nothing(tiny, tiny_classifier, tmp_path):
    with pytest.raises(OcEngineError, match="already exists"):
        export_classifier(tiny_classifier[0], tiny_classifier[1])
    with pytest.raises(OcEngineError, match="not a Hugging Face model"):
        export_classifier(tmp_path, tmp_path / "out")
    causal = tmp_path / "causal"
    tiny("llama").model.save_pretrained(causal)
    with pytest.raises(OcEngineError, match="not a sequence classifier"):
        export_classifier(causal, tmp_path / "out")
    no_tokenizer = tmp_path / "no-tokenizer"
    no_tokenizer.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_classifier[0] / name, no_tokenizer / name)
    with pytest.raises(OcEngineError, match="tokenizer"):
        export_classifier(no_tokenizer, tmp_path / "out")
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(OcEngineError, match="cannot create"):
        export_classifier(tiny_classifier[0], blocker / "out")
    with pytest.raises(OcEngineError, match="unsafe"):
        export_classifier(tiny_classifier[0], tmp_path / "out", ExportOptions(unsafe_label="harmful"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "causal", "no-tokenizer"]


def test_cli_prints_a_summary(tiny_classifier, tmp_path):
    from click.testing import CliRunner

    from oc_engine.cli import main

    result = CliRunner().invoke(main, ["export-classifier", str(tiny_classifier[0]), "--out", str(tmp_path / "out")])
    assert result.exit_code == 0, result.output
    assert "| parity exchanges |" in result.output and "| label flips | 0" in result.output
    again = CliRunner().invoke(main, ["export-classifier", str(tiny_classifier[0]), "--out", str(tmp_path / "out")])
    assert again.exit_code == 1 and "already exists" in again.output and again.output.count("\n") == 1


@pytest.mark.parametrize("family", ["roberta", "deberta-v2"])
def test_other_encoder_families_export_and_match(family, tmp_path):
    from transformers import (AutoTokenizer, DebertaV2Config, DebertaV2ForSequenceClassification, RobertaConfig,
                              RobertaForSequenceClassification)

    from oc_engine.models.embedded import embedded_classifier_backbone

    tokenizer = AutoTokenizer.from_pretrained(embedded_classifier_backbone())
    common = dict(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                  intermediate_size=64, num_labels=3, id2label=LABELS, label2id={v: k for k, v in LABELS.items()},
                  pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    if family == "roberta":
        model = RobertaForSequenceClassification(RobertaConfig(max_position_embeddings=514, type_vocab_size=2,
                                                               **common))
    else:
        model = DebertaV2ForSequenceClassification(DebertaV2Config(max_position_embeddings=512, type_vocab_size=2,
                                                                   relative_attention=True, position_buckets=32,
                                                                   pos_att_type=["p2c", "c2p"], **common))
    model.save_pretrained(tmp_path / "hf")
    tokenizer.save_pretrained(tmp_path / "hf")
    config = export_classifier(tmp_path / "hf", tmp_path / "onnx", ExportOptions(max_length=256))
    assert config["parity"]["max_abs_prob_delta"] <= 1e-4 and config["parity"]["longest_tokens"] >= 256
