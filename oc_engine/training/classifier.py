"""Fine-tune the exchange classifier on labelled JSONL exchanges.

Reads exchanges (null labels skipped and counted), splits them by prompt, adds response
prefixes to the training side (the guard asks about partial answers), weights the classes
by inverse frequency, fine-tunes a Hugging Face sequence classifier with a progress bar,
calibrates the block threshold on the validation split, and writes a Hugging Face
checkpoint directory (plus `oc_engine_training.json`: labels, data, split, calibration,
metrics) atomically: a failure leaves nothing behind.

Every exchange is laid out exactly as the runtime lays out a check (`exchange_layout`): a text
pair within `max_length`, the window that ends at the (partial) answer's last token.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from oc_engine.data import LABELS, UNSAFE, Exchange, read_exchanges
from oc_engine.errors import OcEngineError
from oc_engine.export.onnx_export import TRAINING_FILE
from oc_engine.guard.check_batcher import pad
from oc_engine.guard.classifier import load_sequence_classifier, model_inputs
from oc_engine.guard.exchange_layout import ExchangeLayout
from oc_engine.training.calibration import calibrate_block_threshold
from oc_engine.training.contexts import with_long_requests
from oc_engine.training.metrics import block_rates, per_class_report
from oc_engine.training.splits import grouped_split, response_prefixes, response_slices

BINARY_LABELS = ("safe", "unsafe_compliance")
DELTA_SUBDIR = "delta"  # in a LoRA checkpoint: the shippable delta (see guard/classifier_delta.py)
HUB_BACKBONE = "answerdotai/ModernBERT-base"


@dataclass(frozen=True)
class ClassifierTrainConfig:
    backbone: str | None = None  # None: ModernBERT-base when the hub answers, else the embedded MiniLM
    binary: bool = False  # unsafe_compliance vs the rest, instead of three classes
    epochs: float = 1.0
    batch_size: int = 32
    learning_rate: float = 1e-4
    weight_decay: float = 0.01
    max_length: int = 512  # one window's tokens (exchange_layout): MiniLM's and BERT's full length
    validation: float = 0.15  # share of prompts held out
    prefixes: int = 1  # random response prefixes, and as many mid-answer slices, added per training exchange
    max_train_rows: int | None = None  # cap on training rows after augmentation (time budget)
    target_safe_block_rate: float = 0.01
    bf16: bool | None = None  # autocast to bf16 on CPU; None: when the CPU has native bf16
    lora_rank: int = 0  # > 0: train LoRA adapters of this rank and the head (a small delta), not every weight
    seed: int = 0
    # Requests asked after benign text in the same turn (training/contexts.with_long_requests).
    # Off by default: the shipped delta was built without it (measured: a long benign user turn
    # still pushes p_unsafe up; bench/results/cpu-long-context-2026-12-07.md).
    long_request_share: float = 0.0

    def __post_init__(self):
        if self.epochs <= 0:
            raise OcEngineError(f"epochs must be > 0, got {self.epochs}")
        if self.batch_size < 1 or self.max_length < 16:
            raise OcEngineError("batch size must be >= 1 and max length >= 16")
        if not 0 < self.validation < 1:
            raise OcEngineError(f"validation share must be in (0, 1), got {self.validation}")
        if not 0 <= self.target_safe_block_rate <= 1:
            raise OcEngineError(f"target safe block rate must be in [0, 1], got {self.target_safe_block_rate}")
        if self.prefixes < 0:
            raise OcEngineError(f"prefixes must be >= 0, got {self.prefixes}")
        if self.lora_rank < 0:
            raise OcEngineError(f"LoRA rank must be >= 0 (0: full fine-tune), got {self.lora_rank}")
        if not 0 <= self.long_request_share <= 1:
            raise OcEngineError(f"long request share must be in [0, 1], got {self.long_request_share}")

    @property
    def labels(self) -> tuple[str, ...]:
        return BINARY_LABELS if self.binary else LABELS


@dataclass
class LabelledData:
    train: list[Exchange]
    validation: list[Exchange]
    skipped_null: int
    files: dict = field(default_factory=dict)


def load_training_data(files: list[tuple[str, str | None]], config: ClassifierTrainConfig) -> LabelledData:
    """files: (path, source filter or None). Rows with a null label are skipped and counted."""
    rows, skipped, counts = [], 0, {}
    for path, source in files:
        exchanges, nulls = read_exchanges(path, source_filter=source)
        rows += exchanges
        skipped += nulls
        counts[f"{path}" + (f" [{source}]" if source else "")] = {"rows": len(exchanges), "null_label_skipped": nulls}
    if not rows:
        raise OcEngineError("no labelled exchanges in the given files")
    train, validation = grouped_split(rows, lambda e: e.prompt, config.validation, config.seed)
    if not validation or not train:
        raise OcEngineError(f"too few prompts ({len(rows)} rows) to hold out a validation split")
    # Long requests need not be harmful ones: some of each side asked after benign text.
    train = with_long_requests(train, config.long_request_share, config.seed)
    validation = with_long_requests(validation, config.long_request_share, config.seed)
    return LabelledData(train, validation, skipped, counts)


def augment(train: list[Exchange], config: ClassifierTrainConfig) -> list[Exchange]:
    rng = random.Random(config.seed)
    out = list(train)
    for e in train:
        parts = response_prefixes(e.response, config.prefixes, rng) + response_slices(e.response, config.prefixes, rng)
        out += [Exchange(e.prompt, part, e.label, e.source) for part in parts]
    rng.shuffle(out)
    return out[:config.max_train_rows] if config.max_train_rows else out


def target_of(label: int, binary: bool) -> int:
    return int(label == UNSAFE) if binary else label


def resolve_backbone(backbone: str | None, log: Callable[[str], None]) -> str:
    if backbone:
        return backbone
    from oc_engine.models.embedded import embedded_classifier_backbone

    try:
        from huggingface_hub import model_info

        model_info(HUB_BACKBONE, timeout=5)
        return HUB_BACKBONE
    except Exception:  # noqa: BLE001 - offline, blocked, or no such model
        path = embedded_classifier_backbone()
        log(f"the Hugging Face hub is not reachable; using the embedded backbone all-MiniLM-L6-v2 ({path})")
        return str(path)


def train_classifier(files: list[tuple[str, str | None]], out: str | Path, config: ClassifierTrainConfig, *,
                     log: Callable[[str], None] = lambda m: None, progress: bool = True) -> dict:
    """Train, calibrate and write the checkpoint to `out`; returns the training report."""
    from transformers import AutoTokenizer

    out = Path(out)
    if out.exists():
        raise OcEngineError(f"output {out} already exists (choose a new directory)")
    started = time.perf_counter()
    data = load_training_data(files, config)
    train_rows = augment(data.train, config)
    backbone = resolve_backbone(config.backbone, log)
    labels = config.labels
    log(f"{len(data.train)} training exchanges (+ prefixes = {len(train_rows)}), {len(data.validation)} validation, "
        f"{data.skipped_null} skipped for a null label; backbone {backbone}")
    torch.manual_seed(config.seed)
    try:
        from oc_engine.models.loading import offline_kwargs

        tokenizer = AutoTokenizer.from_pretrained(backbone, **offline_kwargs(backbone))
        model = load_sequence_classifier(backbone, num_labels=len(labels), id2label=dict(enumerate(labels)),
                                         label2id={name: i for i, name in enumerate(labels)},
                                         ignore_mismatched_sizes=True)
    except (OSError, ValueError) as exc:
        raise OcEngineError(f"cannot load the backbone {backbone}: {str(exc).splitlines()[0]}") from exc
    bf16 = _use_bf16(config.bf16)
    weights = class_weights([target_of(e.label, config.binary) for e in train_rows], len(labels))
    fingerprint = None
    if config.lora_rank:
        from oc_engine.guard.classifier_delta import fingerprint_of

        fingerprint = fingerprint_of(model)
        model = with_lora(model, config.lora_rank)
    fit_classifier(model, tokenizer, train_rows, config, weights, bf16, progress)
    if config.lora_rank:
        _round_trainable_to_fp16(model)  # the shipped delta is fp16: calibrate the model it will be
    p_val = predict(model, tokenizer, data.validation, config.max_length, bf16)
    validation_report = evaluate(p_val, data.validation, config)
    report = {"backbone": backbone, "labels": list(labels), "binary": config.binary, "config": asdict(config),
              "bf16": bf16, "data": data.files, "skipped_null_labels": data.skipped_null,
              "split": {"train_exchanges": len(data.train), "train_rows_with_prefixes": len(train_rows),
                        "validation_exchanges": len(data.validation), "grouped_by": "prompt"},
              "class_weights": [round(w, 4) for w in weights.tolist()],
              "calibration": validation_report["calibration"], "validation": validation_report,
              "seconds": None}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        if config.lora_rank:
            from oc_engine.guard.classifier_delta import EMBEDDED_BACKBONE, save_delta
            from oc_engine.models.embedded import embedded_classifier_backbone

            embedded = Path(backbone).resolve() == embedded_classifier_backbone().resolve() \
                if Path(backbone).exists() else False
            save_delta(model, tmp / DELTA_SUBDIR, backbone=EMBEDDED_BACKBONE if embedded else backbone,
                       fingerprint=fingerprint, labels=labels, max_length=config.max_length,
                       calibration=validation_report["calibration"],
                       metrics={"validation": validation_report["operating_point"]})
            model = model.merge_and_unload()
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        report["seconds"] = round(time.perf_counter() - started, 1)
        (tmp / TRAINING_FILE).write_text(json.dumps(report, indent=2) + "\n")
        tmp.chmod(0o755)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return report


def with_lora(model, rank: int):
    """`model` with LoRA adapters of `rank` on every linear layer of the encoder (attention,
    feed-forward, pooler) and the classification head trained in full."""
    from peft import LoraConfig, TaskType, get_peft_model

    targets = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                      if isinstance(module, torch.nn.Linear) and not _is_head(name)})
    config = LoraConfig(task_type=TaskType.SEQ_CLS, r=rank, lora_alpha=2 * rank, lora_dropout=0.05,
                        target_modules=targets)
    return get_peft_model(model, config)


def _is_head(name: str) -> bool:
    return name.split(".")[0] in ("classifier", "score", "head")


def _round_trainable_to_fp16(model) -> None:
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.copy_(param.half().float())


def evaluate(probabilities: np.ndarray, exchanges: list[Exchange], config: ClassifierTrainConfig,
             block_threshold: float | None = None) -> dict:
    """Per-class metrics (argmax) and the block operating point (calibrated here unless given)."""
    labels3 = np.array([e.label for e in exchanges])
    targets = np.array([target_of(e.label, config.binary) for e in exchanges])
    unsafe_index = len(config.labels) - 1
    p_unsafe = probabilities[:, unsafe_index]
    if block_threshold is None:
        calibration = calibrate_block_threshold(p_unsafe, labels3, target_safe_block_rate=config.target_safe_block_rate)
        cal = calibration.as_dict()
        threshold = calibration.block_threshold
    else:
        cal, threshold = None, block_threshold
    blocked = p_unsafe >= threshold
    unsafe = labels3 == UNSAFE
    tp = int((blocked & unsafe).sum())
    precision = tp / max(int(blocked.sum()), 1)
    recall = tp / max(int(unsafe.sum()), 1)
    return {"samples": len(exchanges),
            "per_class": per_class_report(probabilities.argmax(-1), targets, config.labels),
            "operating_point": {"block_threshold": round(threshold, 6), "unsafe_precision": round(precision, 4),
                                "unsafe_recall": round(recall, 4),
                                "unsafe_f1": round(2 * precision * recall / max(precision + recall, 1e-12), 4),
                                "block_rate": block_rates(p_unsafe, labels3, threshold, LABELS)},
            "calibration": cal}


def predict(model, tokenizer, exchanges: list[Exchange], max_length: int, bf16: bool, batch_size: int = 64,
            ) -> np.ndarray:
    """[N, num_labels] probabilities from the PyTorch model, length-sorted batches."""
    model.eval()
    layout = ExchangeLayout(tokenizer, max_length)
    order = sorted(range(len(exchanges)), key=lambda i: len(exchanges[i].prompt) + len(exchanges[i].response))
    out = np.zeros((len(exchanges), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            enc = model_inputs(model, _encode(layout, [exchanges[i] for i in chunk]))
            out[chunk] = model(**enc).logits.float().softmax(-1).numpy()
    return out


def class_weights(targets: list[int], classes: int) -> torch.Tensor:
    """Inverse-frequency weights [classes]; 0 for a class with no rows."""
    counts = np.bincount(np.array(targets), minlength=classes).astype(np.float64)
    weights = np.where(counts > 0, counts.sum() / (classes * np.maximum(counts, 1)), 0.0)
    return torch.tensor(weights, dtype=torch.float32)


def fit_classifier(model, tokenizer, rows: list[Exchange], config: ClassifierTrainConfig, weights: torch.Tensor,
                   bf16: bool, progress: bool, desc: str = "train-classifier") -> None:
    """Fine-tune `model` in place on `rows` (targets by `config.binary`), AdamW with linear warm-up and decay."""
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    rng = random.Random(config.seed)
    epochs = math.ceil(config.epochs)
    per_epoch = math.ceil(len(rows) / config.batch_size)
    total = max(1, int(per_epoch * config.epochs))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    schedule = get_linear_schedule_with_warmup(optimizer, max(1, total // 20), total)
    loss_fn = torch.nn.CrossEntropyLoss(weight=weights)
    layout = ExchangeLayout(tokenizer, config.max_length)
    model.train()
    step = 0
    with tqdm(total=total, desc=desc, unit="batch", disable=not progress) as bar:
        for _ in range(epochs):
            for batch in _batches(rows, config.batch_size, rng):
                if step >= total:
                    return
                enc = model_inputs(model, _encode(layout, batch))
                targets = torch.tensor([target_of(e.label, config.binary) for e in batch])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    logits = model(**enc).logits
                loss = loss_fn(logits.float(), targets)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                optimizer.step()
                schedule.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                bar.set_postfix(loss=f"{loss.item():.3f}")
                bar.update()


# -- internals ----------------------------------------------------------------------------
def _encode(layout: ExchangeLayout, exchanges: list[Exchange]) -> dict:
    """Padded tensors [B, T] of each exchange's last window (`ExchangeLayout.last_window`)."""
    pad_id = layout.tokenizer.pad_token_id if layout.tokenizer.pad_token_id is not None else 0
    batch = pad([layout.last_window(e.prompt, e.response) for e in exchanges], pad_id)
    return {k: torch.from_numpy(v) for k, v in batch.items()}


def _use_bf16(requested: bool | None) -> bool:
    if requested is not None:
        return requested
    from oc_engine.models.loading import cpu_supports_fast_bf16

    return cpu_supports_fast_bf16()


def _batches(rows: list[Exchange], batch_size: int, rng: random.Random) -> list[list[Exchange]]:
    """Shuffled batches of similar lengths (less padding): sort within windows of 50 batches."""
    rows = list(rows)
    rng.shuffle(rows)
    window = batch_size * 50
    batches = []
    for start in range(0, len(rows), window):
        chunk = sorted(rows[start:start + window], key=lambda e: len(e.prompt) + len(e.response))
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches
