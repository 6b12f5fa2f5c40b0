"""Export a Hugging Face sequence classifier to ONNX, checked for parity before anything is written.

torch.onnx.export (the dynamo exporter) with dynamic batch and sequence axes and sdpa or
eager attention; optimum is not used (optimum-onnx 0.1.0 requires transformers < 4.58).
The output directory holds model.onnx, the tokenizer files and classifier_config.json; it
is written into a temporary directory and renamed into place only after the parity check
passes, so a failure leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from oc_engine.engine.classifier import CLASSIFIER_FORMAT, EXCHANGE_FORMAT, render_exchange
from oc_engine.errors import OcEngineError
from oc_engine.export.samples import SAMPLE_EXCHANGES


class _LogitsOnly(torch.nn.Module):
    """The classifier with named tensor inputs and one output, logits [batch, num_labels]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def export_classifier(src: str | Path, out: str | Path, *, unsafe_label: str | int = "unsafe_compliance",
                      max_length: int = 512, tolerance: float = 1e-4,
                      samples: list[tuple[str, str]] | None = None) -> dict:
    """Export `src` to `out`; returns the written classifier config (with its parity report)."""
    import onnxruntime as ort
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = Path(out)
    if out.exists():
        raise OcEngineError(f"output {out} already exists")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src)
        model = AutoModelForSequenceClassification.from_pretrained(src, attn_implementation="sdpa",
                                                                   dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise OcEngineError(f"{src} is not a Hugging Face sequence classifier: {str(exc).splitlines()[0]}") from exc
    labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
    unsafe = unsafe_label if isinstance(unsafe_label, int) else (labels.index(unsafe_label)
                                                                 if unsafe_label in labels else len(labels) - 1)
    texts = [render_exchange(p, r) for p, r in (samples or SAMPLE_EXCHANGES)]
    encoded = tokenizer(texts[:2], return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in encoded]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        with torch.no_grad():
            program = torch.onnx.export(_LogitsOnly(model).eval(), tuple(encoded[n] for n in names), dynamo=True,
                                        input_names=names, output_names=["logits"],
                                        dynamic_shapes={n: {0: batch, 1: seq} for n in names})
        program.save(str(tmp / "model.onnx"))
        parity = _parity(model, tokenizer, tmp / "model.onnx", texts, names, unsafe, max_length, ort)
        if parity["max_abs_prob_delta"] > tolerance:
            raise OcEngineError(f"ONNX parity check failed: max |delta probability| {parity['max_abs_prob_delta']:.2e} "
                                f"> {tolerance:.0e} on {parity['samples']} exchanges; nothing was written")
        tokenizer.save_pretrained(tmp)
        config = {"format": CLASSIFIER_FORMAT, "labels": labels, "unsafe_label": unsafe,
                  "allow_threshold": 0.5, "block_threshold": 0.5, "max_length": max_length,
                  "input_format": EXCHANGE_FORMAT, "source_model": str(src),
                  "exporter": f"torch.onnx dynamo, torch {torch.__version__}",
                  "runtime": f"onnxruntime {version('onnxruntime-gpu') if _has('onnxruntime-gpu') else ort.__version__}",
                  "parity": parity}
        (tmp / "classifier_config.json").write_text(json.dumps(config, indent=2) + "\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
        return config
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _parity(model, tokenizer, onnx_path, texts, names, unsafe, max_length, ort) -> dict:
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    enc = tokenizer(texts, return_tensors="pt", padding=True, truncation=True, max_length=max_length)
    with torch.no_grad():
        reference = model(**{n: enc[n] for n in names}).logits.softmax(-1).numpy()
    logits = session.run(["logits"], {n: enc[n].numpy() for n in names})[0]
    exported = torch.from_numpy(logits).softmax(-1).numpy()
    return {"samples": len(texts), "max_abs_prob_delta": float(np.abs(exported - reference).max()),
            "label_flips": int((exported.argmax(-1) != reference.argmax(-1)).sum()),
            "max_abs_unsafe_delta": float(np.abs(exported[:, unsafe] - reference[:, unsafe]).max())}


def _has(package: str) -> bool:
    try:
        version(package)
        return True
    except Exception:  # noqa: BLE001
        return False
