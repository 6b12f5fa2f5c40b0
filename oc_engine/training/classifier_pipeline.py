"""The classifier workflow behind the CLI: train, export, evaluate, recalibrate, the default build.

Heavy imports (torch, transformers, onnxruntime) happen inside the functions, so the CLI
starts fast.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

from oc_engine.data import require_shared_data_dir
from oc_engine.errors import OcEngineError
from oc_engine.jsonl import write_json_file


# The default build's training fits 20 minutes on a 2-core CPU: one pass over 10,000 rows
# (exchanges, their prefixes and mid-answer slices), each laid out as a check reads it in a
# window of up to 512 tokens (MiniLM's full length; most rows are far shorter).
# On a fresh cache, collecting the embedded model's own answers (once) adds to that. LoRA of
# rank 32 on every linear layer and the head in full: a 3 MB fp16 delta instead of a 90 MB model.
DEFAULT_BUILD = {"max_train_rows": 10_000, "max_length": 512, "lora_rank": 32, "learning_rate": 5e-4}


def parse_data_spec(spec: str) -> tuple[str, str | None]:
    """'FILE' or 'FILE@SOURCE' (keep only rows whose source equals SOURCE)."""
    path, _, source = spec.partition("@")
    if not Path(path).is_file():
        raise OcEngineError(f"data file not found: {path}")
    return path, source or None


def default_data_specs() -> list[tuple[str, str | None]]:
    """The shared files of labelled exchanges; GPTFuzz's evaluate questions are held out."""
    train = require_shared_data_dir() / "train"
    return [(str(train / "gptfuzz_labeled.jsonl"), "gptfuzz:train"), (str(train / "jbb_artifacts.jsonl"), None),
            (str(train / "refusal_direction_completions.jsonl"), None)]


def default_eval_specs() -> list[tuple[str, str | None]]:
    return [(str(require_shared_data_dir() / "train" / "gptfuzz_labeled.jsonl"), "gptfuzz:evaluate")]


def build(*, data_specs, out, export_dir, int8: bool, eval_specs, build_default: bool, force: bool, quiet: bool,
          log=lambda message: None, **train_options) -> dict:
    """train-classifier: returns the report (training, calibration, evaluations, export).
    log: called with one line per step (the CLI prints them)."""
    started = time.perf_counter()
    data = [parse_data_spec(s) for s in data_specs]
    evals = [parse_data_spec(s) for s in eval_specs]
    if build_default:
        return _build_default(data, evals, out, export_dir, int8, force, log, quiet, started, train_options)
    if not data:
        raise OcEngineError("give --data FILE (repeatable), or --default")
    if out is None:
        raise OcEngineError("give --out DIR for the trained checkpoint")
    if export_dir and Path(export_dir).exists():
        raise OcEngineError(f"output {export_dir} already exists (choose a new directory)")
    return _train_export_evaluate(data, evals, out, export_dir, int8, log, quiet, started, train_options)


def _train_export_evaluate(data, evals, out, export_dir, int8, log, quiet, started, train_options) -> dict:
    from oc_engine.training.classifier import ClassifierTrainConfig, train_classifier

    config = ClassifierTrainConfig(**{k: v for k, v in train_options.items() if v is not None})
    report = train_classifier(data, out, config, log=log, progress=not quiet)
    if export_dir:
        from oc_engine.export.onnx_export import ExportOptions, export_classifier

        log(f"exporting to {export_dir}")
        exported = export_classifier(out, export_dir, ExportOptions(precision="int8" if int8 else "fp32",
                                                                    max_length=config.max_length), log=log)
        report["export"] = {"dir": export_dir, "precision": exported["precision"], "parity": exported["parity"]}
    report["evaluations"] = {f"{p}" + (f"@{s}" if s else ""): evaluate_file(out, p, s, config, report)
                             for p, s in evals}
    report["checkpoint"] = str(out)
    report["total_seconds"] = round(time.perf_counter() - started, 1)
    _write_report(Path(out), report)
    return report


def _build_default(data, evals, out, export_dir, int8, force, log, quiet, started, train_options) -> dict:
    """The shipped default: a LoRA delta over the embedded MiniLM, written into the package
    (`oc_engine/assets/default_classifier`), then merged and exported into the cache as
    `generate` would on first use. The full checkpoint is kept in the cache for `headroom`."""
    from oc_engine.guard import classifier_delta
    from oc_engine.models.embedded import default_classifier_checkpoint_dir, default_classifier_delta_dir
    from oc_engine.training.classifier import DELTA_SUBDIR

    if export_dir or int8:
        raise OcEngineError("--default ships a delta and exports it itself: drop --export and --int8")
    target = default_classifier_delta_dir()
    if target.exists() and not force:
        raise OcEngineError(f"{target} already exists (--force rebuilds the default classifier)")
    if not data:
        from oc_engine.training.onpolicy_default import embedded_onpolicy_specs

        data = default_data_specs() + embedded_onpolicy_specs(log, progress=not quiet)
    evals = evals or default_eval_specs()
    for key, value in DEFAULT_BUILD.items():
        if train_options.get(key) is None:
            train_options[key] = value
    final_out = Path(out or default_classifier_checkpoint_dir())
    final_out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".rebuild-", dir=final_out.parent))
    try:  # train beside the old default; swap in only when everything succeeded
        checkpoint = staging / "checkpoint"
        report = _train_export_evaluate(data, evals, str(checkpoint), None, False, log, quiet, started,
                                        train_options)
        delta = checkpoint / DELTA_SUBDIR
        report["delta"] = {"files": {f.name: f.stat().st_size for f in sorted(delta.iterdir())}}
        _swap_in(delta, target)
        _swap_in(checkpoint, final_out)
        exported = classifier_delta.materialize(target, log)
        parity = json.loads((exported / "classifier_config.json").read_text())["parity"]
        report.update(checkpoint=str(final_out), delta={**report["delta"], "dir": str(target)},
                      export={"dir": str(exported), "precision": "fp32", "parity": parity},
                      total_seconds=round(time.perf_counter() - started, 1))
        _write_report(final_out, report)
        return report
    finally:
        import shutil

        shutil.rmtree(staging, ignore_errors=True)


def evaluate_file(checkpoint: str, path: str, source: str | None, config, report: dict) -> dict:
    """Metrics of the trained checkpoint on one labelled file, at its calibrated threshold."""
    from transformers import AutoTokenizer

    from oc_engine.data import read_exchanges
    from oc_engine.guard.classifier import load_sequence_classifier
    from oc_engine.training.classifier import evaluate, predict

    exchanges, skipped = read_exchanges(path, source_filter=source)
    if not exchanges:
        raise OcEngineError(f"{path}: no labelled exchanges" + (f" with source {source}" if source else ""))
    model = load_sequence_classifier(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    probabilities = predict(model, tokenizer, exchanges, config.max_length, report["bf16"])
    result = evaluate(probabilities, exchanges, config, block_threshold=report["calibration"]["block_threshold"])
    result["skipped_null_labels"] = skipped
    return result


def recalibrate(classifier_dir: str, specs: list[tuple[str, str | None]], target: float, *, write: bool) -> dict:
    """calibrate-classifier: a new block threshold for an export directory from labelled files."""
    import numpy as np

    from oc_engine.data import read_exchanges
    from oc_engine.guard.classifier import ExchangeClassifier
    from oc_engine.training.calibration import calibrate_block_threshold

    classifier = ExchangeClassifier(classifier_dir)
    exchanges = [e for path, source in specs for e in read_exchanges(path, source_filter=source)[0]]
    if not exchanges:
        raise OcEngineError("no labelled exchanges in the given files")
    p_unsafe = np.concatenate([
        classifier.probabilities([e.prompt for e in exchanges[i:i + 32]], [e.response for e in exchanges[i:i + 32]])
        [:, classifier.config.unsafe_label] for i in range(0, len(exchanges), 32)])
    classifier.close()
    calibration = calibrate_block_threshold(p_unsafe, np.array([e.label for e in exchanges]),
                                            target_safe_block_rate=target)
    result = calibration.as_dict()
    if write:
        file = Path(classifier_dir) / "classifier_config.json"
        config = json.loads(file.read_text())
        config.update(allow_threshold=calibration.allow_threshold, block_threshold=calibration.block_threshold,
                      calibration={**result, "data": [p + (f"@{s}" if s else "") for p, s in specs]})
        write_json_file(file, config)
        result["written_to"] = str(file)
    return result


def report_markdown(report: dict) -> str:
    from oc_engine.training.metrics import markdown_report

    labels = tuple(report["labels"])
    lines = [f"backbone {report['backbone']}; {report['split']['train_exchanges']} training exchanges "
             f"({report['split']['train_rows_with_prefixes']} rows with prefixes), "
             f"{report['split']['validation_exchanges']} validation; {report['skipped_null_labels']} null labels "
             f"skipped; {report.get('total_seconds', report['seconds'])} s", "",
             "Validation (argmax):", "", markdown_report(report["validation"]["per_class"], labels), ""]
    sections = [("validation", report["validation"])] + list(report.get("evaluations", {}).items())
    lines += ["| data | block threshold | unsafe precision | unsafe recall | unsafe F1 | blocked: "
              + " / ".join(("safe_compliance", "safe_refusal", "unsafe_compliance")) + " |",
              "|---|---:|---:|---:|---:|---|"]
    for name, result in sections:
        op = result["operating_point"]
        rates = " / ".join("-" if v is None else f"{v:.1%}" for v in op["block_rate"].values())
        lines.append(f"| {name} | {op['block_threshold']:.4f} | {op['unsafe_precision']:.3f} | "
                     f"{op['unsafe_recall']:.3f} | {op['unsafe_f1']:.3f} | {rates} |")
    for name, result in report.get("evaluations", {}).items():
        lines += ["", f"{name} (argmax):", "", markdown_report(result["per_class"], labels)]
    if "export" in report:
        parity = report["export"]["parity"]
        lines += ["", f"exported to {report['export']['dir']} ({report['export']['precision']}), max |delta p| "
                      f"{parity['max_abs_prob_delta']:.1e} on {parity['samples']} exchanges"]
    return "\n".join(lines)


def _swap_in(new: Path, final: Path) -> None:
    import shutil

    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(new, final)


def _write_report(checkpoint: Path, report: dict) -> None:
    from oc_engine.export.onnx_export import TRAINING_FILE

    write_json_file(checkpoint / TRAINING_FILE, report)
