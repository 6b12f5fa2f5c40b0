"""Export a Hugging Face sequence classifier to ONNX, checked for parity before anything is written.

1. torch.onnx.export (the dynamo exporter), sdpa attention (eager for DeBERTa, which has no
   sdpa; never flash), dynamic batch and sequence axes;
2. ONNX Runtime's transformer optimizer (its BERT fusions for the BERT family it knows;
   ONNX Runtime's own portable graph optimizations for the others, ModernBERT and DeBERTa);
3. optionally fp16 (for CUDA) or int8 (dynamic quantization, for CPU);
4. parity against PyTorch in fp32 on real exchanges (`../shared/data` when present, else
   samples built into the package), laid out as the runtime lays them out (`exchange_layout`),
   plus one exchange as long as `max_length`, which exercises ModernBERT's sliding-window layers: max |delta probability| within the
   precision's tolerance and a label-flip rate within the stated one.

Everything is written into a temporary directory beside OUT and renamed into place only
after the parity check passes, so a failure leaves nothing behind. optimum is not used:
optimum-onnx 0.1.0 requires transformers < 4.58.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import numpy as np
import torch

from oc_engine.errors import OcEngineError
from oc_engine.guard.check_batcher import pad
from oc_engine.guard.classifier import CLASSIFIER_FORMAT, load_sequence_classifier
from oc_engine.guard.exchange_layout import INPUT_FORMAT, ExchangeLayout

TOLERANCE = {"fp32": 1e-4, "fp16": 2e-2, "int8": 2e-2}
BERT_FUSIONS = {"bert", "roberta", "distilbert", "xlm-roberta", "electra"}  # ORT's "bert" optimizer knows these
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "spm.model", "sentencepiece.bpe.model",
                   "vocab.json")
TRAINING_FILE = "oc_engine_training.json"  # written by train-classifier: labels' thresholds, metrics


@dataclass(frozen=True)
class ExportOptions:
    precision: str = "fp32"  # fp32, fp16 (CUDA) or int8 (dynamic quantization, CPU)
    optimize: bool = True
    max_length: int | None = None  # default: min(512, the model's positions)
    tolerance: float | None = None  # max |delta probability|; default by precision
    max_flip_rate: float = 0.02  # share of parity exchanges whose argmax label may differ
    unsafe_label: str | int | None = None  # default: "unsafe_compliance", or 1 for a binary model
    parity_samples: int = 48

    def __post_init__(self):
        if self.precision not in TOLERANCE:
            raise OcEngineError(f"precision must be one of {', '.join(TOLERANCE)}, got {self.precision!r}")
        if self.max_length is not None and self.max_length < 8:
            raise OcEngineError(f"max length must be >= 8 tokens, got {self.max_length}")
        if not 0 <= self.max_flip_rate <= 1:
            raise OcEngineError(f"max flip rate must be in [0, 1], got {self.max_flip_rate}")

    @property
    def parity_tolerance(self) -> float:
        return TOLERANCE[self.precision] if self.tolerance is None else self.tolerance


class _LogitsOnly(torch.nn.Module):
    """The classifier with named tensor inputs and one output, logits [batch, num_labels]."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        kwargs = {} if token_type_ids is None else {"token_type_ids": token_type_ids}
        return self.model(input_ids=input_ids, attention_mask=attention_mask, **kwargs).logits


def export_classifier(src: str | Path, out: str | Path, options: ExportOptions = ExportOptions(), *,
                      samples: list[tuple[str, str]] | None = None, log=lambda message: None) -> dict:
    """Export `src` to `out`; returns the written classifier config (with its parity report)."""
    out = Path(out)
    created = _check_output(out)
    try:
        return _export_into(src, out, options, samples, log)
    except BaseException:
        for directory in created:  # parents made for OUT go too: a failure leaves the disk as it was
            if directory.is_dir() and not any(directory.iterdir()):
                directory.rmdir()
        raise


def _export_into(src, out: Path, options: ExportOptions, samples, log) -> dict:
    model, tokenizer = _load(src)
    labels = [str(model.config.id2label[i]) for i in range(model.config.num_labels)]
    unsafe = _unsafe_index(labels, options.unsafe_label)
    max_length = options.max_length or min(512, _positions(model))
    if max_length > _positions(model):
        raise OcEngineError(f"max length {max_length} is longer than the model's {_positions(model)} positions")
    layout = ExchangeLayout(tokenizer, max_length)
    texts = _parity_inputs(samples, options.parity_samples, layout)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        log("exporting with torch.onnx (dynamo)")
        names = _export(model, layout, texts, tmp / "raw.onnx")
        log("optimizing with ONNX Runtime" if options.optimize else "skipping graph optimization")
        optimizer = _optimize(tmp / "raw.onnx", tmp / "model.onnx", model.config, options)
        (tmp / "raw.onnx").unlink()
        for extra in tmp.glob("raw.onnx*"):
            extra.unlink()
        log(f"checking parity on {len(texts)} exchanges")
        parity = _parity(model, layout, tmp / "model.onnx", texts, names, unsafe, options)
        tolerance, flips = options.parity_tolerance, parity["label_flips"] / parity["samples"]
        if parity["max_abs_prob_delta"] > tolerance or flips > options.max_flip_rate:
            raise OcEngineError(
                f"ONNX parity check failed ({options.precision}): max |delta probability| "
                f"{parity['max_abs_prob_delta']:.2e} (limit {tolerance:.0e}), label flips {flips:.1%} "
                f"(limit {options.max_flip_rate:.1%}) on {parity['samples']} exchanges; nothing was written")
        tokenizer.save_pretrained(tmp)
        allow, block = _thresholds(Path(src))
        config = {"format": CLASSIFIER_FORMAT, "labels": labels, "unsafe_label": unsafe,
                  "allow_threshold": allow, "block_threshold": block, "max_length": max_length,
                  "input_format": INPUT_FORMAT, "source_model": str(src),
                  "architecture": model.config.architectures[0] if model.config.architectures else None,
                  "precision": options.precision, "optimizer": optimizer,
                  "exporter": f"torch.onnx dynamo, torch {torch.__version__}",
                  "runtime": f"onnxruntime {_ort_version()}", "parity": parity}
        (tmp / "classifier_config.json").write_text(json.dumps(config, indent=2) + "\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
        return config
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# -- steps --------------------------------------------------------------------------------
def _check_output(out: Path) -> list[Path]:
    """Refuse an existing OUT; make its parent; return the directories made (innermost first)."""
    if out.exists():
        raise OcEngineError(f"output {out} already exists (choose a new directory)")
    parent = out.parent
    missing = [d for d in (parent, *parent.parents) if not d.exists()]
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OcEngineError(f"cannot create {parent}: {exc.strerror or exc}") from exc
    if not os.access(parent, os.W_OK):
        raise OcEngineError(f"cannot write into {parent}")
    return missing


def _load(src):
    from transformers import AutoConfig, AutoTokenizer

    from oc_engine.models.loading import offline_kwargs

    offline = offline_kwargs(src)
    try:
        config = AutoConfig.from_pretrained(src, **offline)
    except (OSError, ValueError) as exc:
        raise OcEngineError(f"{src} is not a Hugging Face model: {str(exc).splitlines()[0]}") from exc
    architectures = config.architectures or []
    if architectures and not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise OcEngineError(f"{src} is a {architectures[0]}, not a sequence classifier "
                            "(train one with oc-engine train-classifier)")
    if Path(src).is_dir() and not any((Path(src) / name).is_file() for name in TOKENIZER_FILES):
        raise OcEngineError(f"{src} has no tokenizer files ({', '.join(TOKENIZER_FILES[:2])}, ...)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(src, **offline)
    except (OSError, ValueError, TypeError) as exc:
        raise OcEngineError(f"{src} has no usable tokenizer: {str(exc).splitlines()[0]}") from exc
    try:
        model = load_sequence_classifier(src, dtype=torch.float32).eval()
    except (OSError, ValueError) as exc:
        raise OcEngineError(f"{src} is not a Hugging Face sequence classifier: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


def _unsafe_index(labels: list[str], unsafe: str | int | None) -> int:
    if isinstance(unsafe, int):
        if not 0 <= unsafe < len(labels):
            raise OcEngineError(f"unsafe label {unsafe} is out of range for {len(labels)} labels")
        return unsafe
    name = unsafe or "unsafe_compliance"
    if name in labels:
        return labels.index(name)
    if unsafe is None and len(labels) == 2:
        return 1
    raise OcEngineError(f"no label named {name!r} among {labels}; say which one is unsafe with --unsafe-label")


def _positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 512) or 512)


def _parity_inputs(samples, count: int, layout: ExchangeLayout) -> list[dict]:
    """Model inputs (unpadded) of real exchanges, and one window of exactly `max_length` tokens:
    sliding-window layers must survive the export."""
    from oc_engine.data import parity_exchanges
    from oc_engine.export.samples import SAMPLE_EXCHANGES

    pairs = list(samples or parity_exchanges(count) or SAMPLE_EXCHANGES)
    items = [layout.last_window(p, r) for p, r in pairs]
    long_response = " ".join(r for _, r in pairs)
    while len(layout.last_window(pairs[0][0], long_response)["input_ids"]) < layout.max_length:
        long_response += " " + long_response
    return items + [layout.last_window(pairs[0][0], long_response)]


def _batch(layout: ExchangeLayout, items: list[dict]) -> dict:
    """Padded tensors [B, T] of these inputs."""
    pad_id = layout.tokenizer.pad_token_id if layout.tokenizer.pad_token_id is not None else 0
    return {k: torch.from_numpy(v) for k, v in pad(items, pad_id).items()}


def _export(model, layout: ExchangeLayout, items: list[dict], path: Path) -> list[str]:
    import inspect

    encoded = _batch(layout, items[:2])
    accepted = inspect.signature(model.forward).parameters
    names = [n for n in ("input_ids", "attention_mask", "token_type_ids") if n in encoded and n in accepted]
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    try:
        with torch.no_grad():
            program = torch.onnx.export(_LogitsOnly(model).eval(), tuple(encoded[n] for n in names), dynamo=True,
                                        input_names=names, output_names=["logits"],
                                        dynamic_shapes={n: {0: batch, 1: seq} for n in names}, verbose=False)
    except Exception as exc:  # noqa: BLE001 - the exporter raises many types
        raise OcEngineError(f"torch.onnx.export failed: {str(exc).splitlines()[0]}") from exc
    program.save(str(path))
    return names


def _optimize(raw: Path, path: Path, config, options: ExportOptions) -> dict:
    """ORT's optimizer (+ fp16 / int8) from raw to path; returns what was done."""
    from onnxruntime.transformers.optimizer import optimize_model

    fused: dict = {}
    if options.optimize:
        known = config.model_type in BERT_FUSIONS
        model = optimize_model(str(raw), model_type="bert", num_heads=config.num_attention_heads if known else 0,
                               hidden_size=config.hidden_size if known else 0, opt_level=1,
                               only_onnxruntime=not known, use_gpu=options.precision == "fp16")
        if known:
            fused = {k: v for k, v in model.get_fused_operator_statistics().items() if v}
        summary = {"optimizer": "onnxruntime.transformers bert fusions" if known
                   else "onnxruntime graph optimizations (basic; no fusions known for " + config.model_type + ")",
                   "fused_operators": fused}
    else:
        import onnx

        from onnxruntime.transformers.onnx_model import OnnxModel

        model = OnnxModel(onnx.load(str(raw)))
        summary = {"optimizer": "none", "fused_operators": {}}
    if options.precision == "fp16":
        model.convert_float_to_float16(keep_io_types=True)
    if options.precision == "int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        staged = path.with_name("optimized.onnx")
        del model.model.graph.value_info[:]  # stale shapes from the optimizer trip the quantizer's inference
        model.save_model_to_file(str(staged))
        import logging

        import onnx

        root = logging.getLogger()
        level, root.level = root.level, logging.ERROR  # the quantizer warns on the root logger per fused tensor
        try:
            quantize_dynamic(str(staged), str(path), weight_type=QuantType.QInt8, per_channel=True,
                             extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        finally:
            root.level = level
        staged.unlink()
    else:
        model.save_model_to_file(str(path))
    return summary


def _parity(model, layout: ExchangeLayout, onnx_path: Path, texts: list[dict], names, unsafe: int,
            options: ExportOptions) -> dict:
    import onnxruntime as ort

    on_gpu = options.precision == "fp16" and torch.cuda.is_available() and \
        "CUDAExecutionProvider" in ort.get_available_providers()
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if on_gpu else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(onnx_path), providers=providers)
    except Exception as exc:  # noqa: BLE001
        raise OcEngineError(f"the exported model cannot be loaded by ONNX Runtime: {str(exc).splitlines()[0]}") \
            from exc
    reference, exported, seconds = [], [], 0.0
    for start in range(0, len(texts), 8):  # small batches: padding stays realistic
        enc = _batch(layout, texts[start:start + 8])
        with torch.no_grad():
            reference.append(model(**{n: enc[n] for n in names}).logits.float().softmax(-1).numpy())
        t0 = time.perf_counter()
        logits = session.run(["logits"], {n: enc[n].numpy() for n in names})[0]
        seconds += time.perf_counter() - t0
        exported.append(torch.from_numpy(logits.astype(np.float32)).softmax(-1).numpy())
    ref, got = np.concatenate(reference), np.concatenate(exported)
    return {"samples": len(texts), "precision": options.precision, "provider": providers[0],
            "max_abs_prob_delta": float(np.abs(got - ref).max()),
            "mean_abs_prob_delta": float(np.abs(got - ref).mean()),
            "max_abs_unsafe_delta": float(np.abs(got[:, unsafe] - ref[:, unsafe]).max()),
            "label_flips": int((got.argmax(-1) != ref.argmax(-1)).sum()),
            "tolerance": options.parity_tolerance, "max_flip_rate": options.max_flip_rate,
            "longest_tokens": int(max(len(item["input_ids"]) for item in texts)),
            "onnx_seconds": round(seconds, 3)}


def _thresholds(src: Path) -> tuple[float, float]:
    """The calibrated (allow, block) thresholds that train-classifier stored, else 0.5 / 0.5."""
    file = src / TRAINING_FILE
    if src.is_dir() and file.is_file():
        calibration = json.loads(file.read_text()).get("calibration") or {}
        if "block_threshold" in calibration:
            block = float(calibration["block_threshold"])
            return float(calibration.get("allow_threshold", block)), block
    return 0.5, 0.5


def _ort_version() -> str:
    for package in ("onnxruntime-gpu", "onnxruntime"):
        try:
            return version(package)
        except Exception:  # noqa: BLE001
            continue
    return "unknown"
