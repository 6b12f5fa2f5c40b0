"""Bad input gets one clear error: prompts files, long prompts, model paths."""

import json

import pytest
import torch

from oc_engine.engine.prompts import read_prompts_file
from oc_engine.errors import OcEngineError
from oc_engine.models.loading import load_model, resolve_dtype, resolve_model_source


def test_jsonl_prompts_file(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "one"}\n\n{"prompt": "two", "prompt_label": "benign"}\n')
    assert read_prompts_file(path) == ["one", "two"]


def test_plain_prompts_file(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("first prompt\n\nsecond prompt\n")
    assert read_prompts_file(path) == ["first prompt", "second prompt"]


@pytest.mark.parametrize("lines,message", [
    (['{"prompt": "ok"}', '{"prompt": "ok"}', "{not json"], r"p\.jsonl:3: not valid JSON"),
    (['{"prompt": "ok"}', '{"text": "no prompt"}'], r"p\.jsonl:2: missing field 'prompt'"),
    (['{"prompt": 5}'], r"p\.jsonl:1: 'prompt' must be a non-empty string"),
    (['["a list"]'], r"p\.jsonl:1: expected a JSON object"),
])
def test_bad_prompts_file_names_the_line(tmp_path, lines, message):
    path = tmp_path / "p.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(OcEngineError, match=message):
        read_prompts_file(path)


def test_empty_or_missing_prompts_file(tmp_path):
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(OcEngineError, match="no prompts"):
        read_prompts_file(tmp_path / "empty.txt")
    with pytest.raises(OcEngineError, match="cannot read"):
        read_prompts_file(tmp_path / "absent.txt")


def test_prompt_longer_than_the_context(tiny):
    from probe_helpers import fixed, plain_llm

    llm = plain_llm(tiny("llama"), max_model_len=None)  # the model's context: 256
    with pytest.raises(OcEngineError, match="prompt 2 has 300 tokens, too long for max_model_len 256"):
        llm.generate([[2, 3], [2] * 300], fixed(4))
    assert not llm.has_unfinished()  # the good prompt was not queued either: nothing took a slot
    with pytest.raises(OcEngineError, match=r"max_model_len must be an integer in \[2, 256\]"):
        plain_llm(tiny("llama"), max_model_len=300)


def test_generation_stops_at_the_context(tiny):
    from probe_helpers import fixed, plain_llm

    result = plain_llm(tiny("llama"), max_model_len=None).generate([[2] * 250], fixed(50))[0]
    assert len(result.token_ids) == 6 and result.finish_reason == "length"


def test_unknown_model_sources(tmp_path):
    with pytest.raises(OcEngineError, match="model not found"):
        resolve_model_source(str(tmp_path / "nope"))
    with pytest.raises(OcEngineError, match="no config.json"):
        resolve_model_source(str(tmp_path))
    with pytest.raises(OcEngineError, match="GGUF file not found"):
        resolve_model_source(str(tmp_path / "model.gguf"))
    with pytest.raises(OcEngineError, match="unknown dtype"):
        resolve_dtype("int3", torch.device("cpu"))


def test_local_directory_loads_from_safetensors_only(tiny, tmp_path):
    loaded = tiny("qwen3")
    loaded.model.save_pretrained(tmp_path / "m")
    loaded.tokenizer.save_pretrained(tmp_path / "m")
    again = load_model(str(tmp_path / "m"), device="cpu", dtype="float32")
    assert again.source == str((tmp_path / "m").resolve())
    ids = torch.tensor([[2, 5, 9]])
    torch.testing.assert_close(again.model(ids).logits, loaded.model(ids).logits)
    (tmp_path / "m" / "model.safetensors").rename(tmp_path / "m" / "pytorch_model.bin")
    with pytest.raises(OcEngineError, match="cannot load model"):
        load_model(str(tmp_path / "m"), device="cpu", dtype="float32")


@pytest.mark.slow
def test_embedded_model_is_cached_as_plain_safetensors(embedded_fp32):
    path = resolve_model_source(None)
    assert path == embedded_fp32.source
    config = json.loads(open(f"{path}/config.json").read())
    assert "quantization_config" not in config
    from pathlib import Path
    files = {p.name for p in Path(path).iterdir()}
    assert "model.safetensors" in files and not any(f.endswith((".bin", ".gguf", ".pt")) for f in files)
    assert embedded_fp32.model.config.num_hidden_layers == 30


def test_an_unreachable_hub_fails_at_once(monkeypatch):
    """A hub id while the hub cannot be reached: the load is local-only (no minute of the hub
    client's retries) and fails with one line."""
    from huggingface_hub import constants

    from oc_engine.models.loading import hub_reachable

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    assert hub_reachable() is False
    with pytest.raises(OcEngineError, match="the hub cannot be reached and the model is not in the local"):
        load_model("org/not-cached-anywhere", device="cpu", dtype="float32")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub_reachable() is False


def test_a_non_finite_probability_is_never_a_verdict():
    from oc_engine.guard.classifier import ClassifierConfig

    config = ClassifierConfig(labels=("safe", "unsafe"), unsafe_label=1, allow_threshold=0.2, block_threshold=0.6,
                              max_length=64)
    assert [config.verdict(p) for p in (0.1, 0.3, 0.7, float("nan"))] == ["allow", "uncertain", "block", "error"]
