"""A classifier shipped as a small delta over a backbone: LoRA adapters and a head, in fp16.

    adapter_config.json         peft's LoRA configuration
    adapter_model.safetensors   the adapters and the classification head, fp16
    classifier_delta.json       format, backbone and its fingerprint, labels, max_length,
                                thresholds, training metrics

The default classifier ships this way inside the package (a few MB instead of a 90 MB
model). On first use the delta is merged into the backbone (peft), exported to ONNX with the
parity gate (`export_classifier`), and cached under `cache_root()/classifier-delta/<digest>/`;
the digest covers every file, so a changed or corrupt delta is never served from an old export.
A missing or unreadable file is one error naming it, and a delta for another backbone is
refused by fingerprint, as probes are: the guard never runs with a stage silently dropped.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from oc_engine.errors import OcEngineError

DELTA_FORMAT = "oc-engine-classifier-delta/2"  # /1 read `User: ... Assistant: ...`, cut at max_length
DELTA_CONFIG, ADAPTER_CONFIG, ADAPTER_WEIGHTS = "classifier_delta.json", "adapter_config.json", \
    "adapter_model.safetensors"
DELTA_FILES = (DELTA_CONFIG, ADAPTER_CONFIG, ADAPTER_WEIGHTS)
EMBEDDED_BACKBONE = "embedded:all-MiniLM-L6-v2"


def is_delta_dir(path: str | Path) -> bool:
    return (Path(path) / DELTA_CONFIG).is_file()


@dataclass(frozen=True)
class ClassifierDelta:
    path: Path
    backbone: str  # EMBEDDED_BACKBONE, a local directory or a hub id
    fingerprint: dict  # ModelFingerprint fields of the backbone loaded as a sequence classifier
    labels: tuple[str, ...]
    max_length: int
    allow_threshold: float
    block_threshold: float
    digest: str  # sha256 over the three files

    def backbone_dir(self) -> str:
        if self.backbone == EMBEDDED_BACKBONE:
            from oc_engine.models.embedded import embedded_classifier_backbone

            return str(embedded_classifier_backbone())
        return self.backbone


def read_delta(path: str | Path) -> ClassifierDelta:
    """Check the delta's files (present, valid JSON, readable safetensors) and read its config."""
    from safetensors import safe_open

    from oc_engine.config_fields import Fields

    path = Path(path)
    digest = hashlib.sha256()
    for name in DELTA_FILES:
        file = path / name
        if not file.is_file():
            raise OcEngineError(f"classifier delta file is missing: {file}")
        digest.update(name.encode() + b"\0" + file.read_bytes())
    for name in (DELTA_CONFIG, ADAPTER_CONFIG):
        try:
            json.loads((path / name).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise OcEngineError(f"classifier delta file is corrupt: {path / name} ({exc})") from None
    try:
        with safe_open(str(path / ADAPTER_WEIGHTS), framework="pt") as handle:
            if not list(handle.keys()):
                raise OcEngineError(f"classifier delta file is corrupt: {path / ADAPTER_WEIGHTS} (no tensors)")
    except OcEngineError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise OcEngineError(f"classifier delta file is corrupt: {path / ADAPTER_WEIGHTS} ({exc})") from None
    raw = json.loads((path / DELTA_CONFIG).read_text(encoding="utf-8"))
    if raw.get("format") == "oc-engine-classifier-delta/1":
        raise OcEngineError(f"{path / DELTA_CONFIG}: this delta was trained for the retired `User: ... Assistant: "
                            "...` input, cut at max_length (a long prompt hid the answer); retrain it with "
                            "`oc-engine train-classifier`")
    if raw.get("format") != DELTA_FORMAT:
        raise OcEngineError(f"{path / DELTA_CONFIG}: not an oc-engine classifier delta ({DELTA_FORMAT!r} expected)")
    fields = Fields(raw, str(path / DELTA_CONFIG))
    fingerprint = raw.get("fingerprint")
    if not isinstance(fingerprint, dict) or "weights_hash" not in fingerprint:
        raise OcEngineError(f"{path / DELTA_CONFIG}: 'fingerprint' of the backbone is missing")
    block = fields.number("block_threshold")
    return ClassifierDelta(path=path, backbone=fields.string("backbone"), fingerprint=fingerprint,
                           labels=fields.strings("labels"), max_length=fields.integer("max_length"),
                           allow_threshold=fields.number("allow_threshold", block), block_threshold=block,
                           digest=digest.hexdigest())


def fingerprint_of(model) -> dict:
    from dataclasses import asdict

    from oc_engine.guard.probe import ModelFingerprint

    fingerprint = asdict(ModelFingerprint.of(model))
    fingerprint.pop("quantization")  # a classifier backbone is never quantized; deltas predate the field
    return fingerprint


def save_delta(peft_model, out: Path, *, backbone: str, fingerprint: dict, labels, max_length: int,
               calibration: dict, metrics: dict) -> None:
    """Write the adapters and head (fp16) and the delta config into `out` (a new directory)."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    state = {k: v.detach().to("cpu").half().contiguous() for k, v in get_peft_model_state_dict(peft_model).items()}
    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    peft_model.peft_config["default"].save_pretrained(str(out))
    block = float(calibration["block_threshold"])
    config = {"format": DELTA_FORMAT, "backbone": backbone, "fingerprint": fingerprint, "labels": list(labels),
              "max_length": max_length, "allow_threshold": float(calibration.get("allow_threshold", block)),
              "block_threshold": block, "calibration": calibration, "metrics": metrics}
    (out / DELTA_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def merged_model(delta: ClassifierDelta):
    """The backbone with the delta merged in (a plain Hugging Face sequence classifier), after
    checking the backbone's fingerprint."""
    from peft import PeftModel

    from oc_engine.guard.classifier import load_sequence_classifier

    labels = list(delta.labels)
    try:
        base = load_sequence_classifier(delta.backbone_dir(), num_labels=len(labels),
                                        id2label=dict(enumerate(labels)),
                                        label2id={name: i for i, name in enumerate(labels)},
                                        ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise OcEngineError(f"cannot load the classifier backbone {delta.backbone}: {str(exc).splitlines()[0]}") \
            from None
    found = fingerprint_of(base)
    if found != delta.fingerprint:
        raise OcEngineError(f"{delta.path / DELTA_CONFIG} was trained on another backbone (fingerprint "
                            f"{delta.fingerprint.get('weights_hash')}, {delta.fingerprint.get('architecture')}); "
                            f"{delta.backbone} is {found['weights_hash']} ({found['architecture']})")
    try:
        model = PeftModel.from_pretrained(base, str(delta.path)).merge_and_unload()
    except Exception as exc:  # noqa: BLE001 - peft and safetensors raise many types
        raise OcEngineError(f"cannot apply the classifier delta {delta.path / ADAPTER_WEIGHTS}: "
                            f"{str(exc).splitlines()[0]}") from None
    return model.eval()


def materialized_dir(delta: ClassifierDelta) -> Path:
    from oc_engine.models.embedded import cache_root

    return cache_root() / "classifier-delta" / delta.digest[:16]


def materialize(path: str | Path, log: Callable[[str], None] = lambda m: None) -> Path:
    """The ONNX export directory of the delta at `path`, built and cached on first use."""
    delta = read_delta(path)
    root = materialized_dir(delta)
    export = root / "export"
    if (export / "classifier_config.json").is_file():
        return export
    from transformers import AutoTokenizer

    from oc_engine.export.onnx_export import TRAINING_FILE, ExportOptions, export_classifier

    log(f"building the classifier from its delta {delta.path} (once; cached in {root})")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
    try:
        checkpoint = staging / "checkpoint"
        merged_model(delta).save_pretrained(checkpoint)
        AutoTokenizer.from_pretrained(delta.backbone_dir()).save_pretrained(checkpoint)
        calibration = {"allow_threshold": delta.allow_threshold, "block_threshold": delta.block_threshold}
        (checkpoint / TRAINING_FILE).write_text(json.dumps({"calibration": calibration, "delta": str(delta.path),
                                                            "labels": list(delta.labels)}, indent=2) + "\n")
        export_classifier(checkpoint, staging / "export", ExportOptions(max_length=delta.max_length), log=log)
        config_file = staging / "export" / "classifier_config.json"
        config = json.loads(config_file.read_text())
        config["source_model"] = str(root / "checkpoint")  # where the checkpoint will live
        config["delta"] = {"path": str(delta.path), "digest": delta.digest}
        config_file.write_text(json.dumps(config, indent=2) + "\n")
        for name in ("checkpoint", "export"):  # the export last: its presence means the build is whole
            if not (root / name / ("classifier_config.json" if name == "export" else "config.json")).exists():
                shutil.rmtree(root / name, ignore_errors=True)
                try:
                    os.replace(staging / name, root / name)
                except OSError:  # another process built it meanwhile: use theirs
                    if not (root / name).is_dir():
                        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return export
