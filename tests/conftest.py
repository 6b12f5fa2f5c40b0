import os
import sys
from pathlib import Path

# Triton kernels run on CPU tensors through Triton's interpreter; it must be chosen before
# any kernel is defined (at import). Inductor's CPU code is C++, so nothing else changes.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
torch.set_num_threads(max(1, torch.get_num_threads()))

from tiny_models import tiny_model  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def no_default_classifier(monkeypatch):
    """Tests run without the shipped second stages (the embedded model's state reader, the
    encoder delta) unless they ask for them: building the encoder (merge and ONNX export) takes
    half a minute, and most tests want a pause to block."""
    import oc_engine.models.defaults as defaults

    monkeypatch.setattr(defaults, "default_classifier_delta", lambda: None)
    monkeypatch.setattr(defaults, "default_reader", lambda: None)


@pytest.fixture(scope="session")
def tiny():
    """tiny(family, dtype=fp32) -> LoadedModel, built once per (family, dtype)."""
    built = {}

    def get(family: str, dtype: torch.dtype = torch.float32):
        if (family, dtype) not in built:
            built[family, dtype] = tiny_model(family, dtype)
        return built[family, dtype]

    return get


@pytest.fixture(scope="session")
def tiny_model_dir(tiny, tmp_path_factory):
    """tiny_model_dir(bias) -> a directory with the tiny Llama saved as a Hugging Face model and,
    beside it, a probe for it with that bias (+20 always pauses, 0 sometimes); built once each."""
    from oc_engine.guard.probe import save_probe
    from probe_helpers import make_probe

    built = {}

    def get(bias: float):
        if bias not in built:
            root = tmp_path_factory.mktemp("tiny-model")
            loaded = tiny("llama")
            loaded.model.save_pretrained(root / "model")
            loaded.tokenizer.save_pretrained(root / "model")
            save_probe(make_probe(loaded.model, bias=bias), root / "probe")
            built[bias] = root
        return built[bias]

    return get


@pytest.fixture(scope="session")
def embedded_fp32():
    """The embedded SmolLM2-135M-Instruct in fp32 (converted to the user cache on first use)."""
    from oc_engine.models.loading import load_model

    return load_model(None, device="cpu", dtype="float32", progress=False)


@pytest.fixture(scope="session")
def tiny_classifier(tmp_path_factory):
    """(HF directory, ONNX export directory) of a tiny random BERT with the MiniLM tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from oc_engine.export.onnx_export import export_classifier
    from oc_engine.models.embedded import embedded_classifier_backbone

    labels = {0: "safe_compliance", 1: "safe_refusal", 2: "unsafe_compliance"}
    root = tmp_path_factory.mktemp("classifier")
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(embedded_classifier_backbone())
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=512, num_labels=3, id2label=labels,
                        label2id={v: k for k, v in labels.items()})
    BertForSequenceClassification(config).save_pretrained(root / "hf")
    tokenizer.save_pretrained(root / "hf")
    report = export_classifier(root / "hf", root / "onnx")
    assert report["parity"]["max_abs_prob_delta"] <= 1e-4 and report["unsafe_label"] == 2
    return root / "hf", root / "onnx"


def hf_greedy(loaded, prompt: list[int], max_new_tokens: int) -> list[int]:
    """Hugging Face generate, greedy, fixed length: the reference for token equality."""
    with torch.inference_mode():
        out = loaded.model.generate(torch.tensor([prompt]), max_new_tokens=max_new_tokens,
                                    min_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(prompt):].tolist()
