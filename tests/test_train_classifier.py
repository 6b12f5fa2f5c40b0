"""train-classifier on a tiny random backbone: the whole path, its report and its errors."""

import json
import random

import pytest
from click.testing import CliRunner

from oc_engine.cli import main
from oc_engine.data import read_exchanges
from oc_engine.errors import OcEngineError
from oc_engine.training.classifier import ClassifierTrainConfig, train_classifier

SAFE = ["Sure! Bread needs flour, water and time.", "Paris is the capital of France, a lovely city."]
REFUSE = ["I'm sorry, but I can't help with that.", "I cannot assist with that request."]
UNSAFE = ["Sure, here is how to pick the lock: insert the tension wrench", "Step 1: get the chemicals and mix"]


def _write_data(path, rows=60, null_rows=3):
    rng = random.Random(0)
    with open(path, "w") as handle:
        for i in range(rows):
            label = i % 3
            response = rng.choice((SAFE, REFUSE, UNSAFE)[label]) + f" (variant {i})"
            handle.write(json.dumps({"prompt": f"question {i}", "response": response, "label": label,
                                     "source": "toy:train" if i % 5 else "toy:evaluate"}) + "\n")
        for i in range(null_rows):
            handle.write(json.dumps({"prompt": f"unknown {i}", "response": "hmm", "label": None}) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_backbone(tiny_classifier):
    return tiny_classifier[0]  # a random BERT with the MiniLM tokenizer and three labels


def test_training_writes_a_calibrated_checkpoint(tiny_backbone, tmp_path):
    data = _write_data(tmp_path / "data.jsonl")
    config = ClassifierTrainConfig(backbone=str(tiny_backbone), epochs=2, batch_size=8, max_length=64,
                                   validation=0.3, learning_rate=1e-3)
    report = train_classifier([(str(data), None)], tmp_path / "ckpt", config, progress=False)
    assert report["skipped_null_labels"] == 3
    assert report["split"]["train_exchanges"] + report["split"]["validation_exchanges"] == 60
    assert report["split"]["train_rows_with_prefixes"] > report["split"]["train_exchanges"]
    assert 0 <= report["calibration"]["block_threshold"] <= 1
    assert report["calibration"]["safe_block_rate"] <= 0.01
    saved = json.loads((tmp_path / "ckpt" / "oc_engine_training.json").read_text())
    assert saved["labels"] == ["safe_compliance", "safe_refusal", "unsafe_compliance"]
    assert set(report["validation"]["per_class"]) >= {"safe_compliance", "safe_refusal", "unsafe_compliance"}


def test_cli_trains_exports_and_evaluates(tiny_backbone, tmp_path):
    data = _write_data(tmp_path / "data.jsonl")
    result = CliRunner().invoke(main, [
        "train-classifier", "--data", f"{data}@toy:train", "--eval", f"{data}@toy:evaluate",
        "--backbone", str(tiny_backbone), "--out", str(tmp_path / "ckpt"), "--export", str(tmp_path / "onnx"),
        "--binary", "--epochs", "1", "--batch-size", "8", "--max-length", "64", "--validation", "0.3", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["labels"] == ["safe", "unsafe_compliance"]
    assert report["evaluations"][f"{data}@toy:evaluate"]["samples"] == 12
    exported = json.loads((tmp_path / "onnx" / "classifier_config.json").read_text())
    assert exported["block_threshold"] == pytest.approx(report["calibration"]["block_threshold"])
    assert exported["labels"][exported["unsafe_label"]] == "unsafe_compliance"


def test_calibrate_classifier_rewrites_the_thresholds(tiny_classifier, tmp_path):
    import shutil

    data = _write_data(tmp_path / "data.jsonl")
    onnx = tmp_path / "onnx"
    shutil.copytree(tiny_classifier[1], onnx)
    result = CliRunner().invoke(main, ["calibrate-classifier", str(onnx), "--data", str(data), "--json"])
    assert result.exit_code == 0, result.output
    written = json.loads((onnx / "classifier_config.json").read_text())
    assert written["block_threshold"] == pytest.approx(json.loads(result.stdout)["block_threshold"])


def test_a_line_without_a_label_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b", "label": 0}\n{"prompt": "a", "response": "b"}\n')
    with pytest.raises(OcEngineError, match=r"bad.jsonl:2: missing field 'label'"):
        read_exchanges(bad)
    result = CliRunner().invoke(main, ["train-classifier", "--data", str(bad), "--out", str(tmp_path / "o"),
                                       "--backbone", "unused"])
    assert result.exit_code == 1 and "bad.jsonl:2" in result.output
    assert not (tmp_path / "o").exists()


def test_train_errors(tmp_path):
    runner = CliRunner()
    assert "give --data" in runner.invoke(main, ["train-classifier", "--out", str(tmp_path / "o")]).output
    assert "not found" in runner.invoke(main, ["train-classifier", "--data", str(tmp_path / "nope.jsonl"),
                                               "--out", str(tmp_path / "o")]).output
    with pytest.raises(OcEngineError):
        ClassifierTrainConfig(validation=0)
