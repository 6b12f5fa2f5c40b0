"""Probe directories: round trip, and one clear error for each way they can be wrong."""

import json

import pytest
import torch

from oc_engine.errors import OcEngineError
from oc_engine.guard.probe import ModelFingerprint, load_probe, save_probe
from probe_helpers import make_probe


def test_round_trip(tiny, tmp_path):
    probe = make_probe(tiny("llama").model, bias=0.5, layers=(-2, 1), warn=0.4, pause=0.7, every=2)
    save_probe(probe, tmp_path / "p")
    again = load_probe(tmp_path / "p")
    assert again.config == probe.config
    torch.testing.assert_close(again.weight, probe.weight)
    again.check_model(tiny("llama").model)


def test_fingerprint_ignores_dtype(tiny):
    assert ModelFingerprint.of(tiny("llama").model) == ModelFingerprint.of(tiny("llama", torch.bfloat16).model)


def _saved(tiny, tmp_path):
    save_probe(make_probe(tiny("llama").model, bias=0.0), tmp_path / "p")
    return tmp_path / "p"


def _edit_config(path, **changes):
    config = json.loads((path / "probe_config.json").read_text())
    config.update(changes)
    (path / "probe_config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("change,message", [
    (dict(pause=1.5), "pause threshold must be in"),
    (dict(warn=0.9, pause=0.5), "warn threshold .* is above the pause"),
    (dict(alpha=0.0), "alpha must be in"),
    (dict(every=0), "'every' must be >= 1"),
    (dict(hidden_size=65), "weight shape"),
    (dict(format="something-else"), "not an oc-engine probe"),
])
def test_bad_config_values(tiny, tmp_path, change, message):
    path = _saved(tiny, tmp_path)
    _edit_config(path, **change)
    with pytest.raises(OcEngineError, match=message):
        load_probe(path)


def test_missing_and_corrupt_files(tiny, tmp_path):
    path = _saved(tiny, tmp_path)
    (path / "probe.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(OcEngineError, match="is corrupt"):
        load_probe(path)
    (path / "probe.safetensors").unlink()
    with pytest.raises(OcEngineError, match="has no probe.safetensors"):
        load_probe(path)
    (path / "probe_config.json").write_text("{oops")
    with pytest.raises(OcEngineError, match="probe directory .* has no|not valid JSON"):
        load_probe(path)
    with pytest.raises(OcEngineError, match="not found"):
        load_probe(tmp_path / "absent")


def test_wrong_model_and_hidden_size(tiny, tmp_path):
    probe = load_probe(_saved(tiny, tmp_path))
    with pytest.raises(OcEngineError, match="trained for another model"):
        probe.check_model(tiny("qwen3").model)


def test_save_refuses_a_non_empty_directory(tiny, tmp_path):
    (tmp_path / "p").mkdir()
    (tmp_path / "p" / "keep.txt").write_text("x")
    with pytest.raises(OcEngineError, match="not empty"):
        save_probe(make_probe(tiny("llama").model, bias=0.0), tmp_path / "p")
    assert [f.name for f in (tmp_path / "p").iterdir()] == ["keep.txt"]
