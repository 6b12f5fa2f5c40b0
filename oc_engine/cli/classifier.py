"""`export-classifier`, `train-classifier` and `calibrate-classifier`."""

from __future__ import annotations

import json
from pathlib import Path

import click

from oc_engine.cli.common import (FiniteFloat, check_output_dir, json_option, markdown_rows, progress_log,
                                       seed_option, user_errors)
from oc_engine.training.classifier_pipeline import parse_data_spec


def export_summary(config: dict, out: Path) -> str:
    parity = config["parity"]
    size = (out / "model.onnx").stat().st_size / 2 ** 20
    fused = ", ".join(f"{k} {v}" for k, v in config["optimizer"]["fused_operators"].items()) or "none"
    return markdown_rows([
        ("output", str(out)), ("source", config["source_model"]), ("architecture", str(config["architecture"])),
        ("labels", ", ".join(config["labels"])), ("unsafe label", config["labels"][config["unsafe_label"]]),
        ("allow / block threshold", f"{config['allow_threshold']:.4f} / {config['block_threshold']:.4f}"),
        ("precision", config["precision"]), ("optimizer", config["optimizer"]["optimizer"]),
        ("fused operators", fused), ("model.onnx", f"{size:.1f} MiB"), ("max length", str(config["max_length"])),
        ("parity exchanges", f"{parity['samples']} (longest {parity['longest_tokens']} tokens)"),
        ("max / mean abs delta probability", f"{parity['max_abs_prob_delta']:.2e} / {parity['mean_abs_prob_delta']:.2e}"
                                             f" (limit {parity['tolerance']:.0e})"),
        ("label flips", f"{parity['label_flips']} (limit {parity['max_flip_rate']:.1%})"),
        ("runtime", config["runtime"]), ("exporter", config["exporter"]),
    ], header=("export", "value"))


@click.command("export-classifier")
@click.argument("src")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="ONNX directory to write (classifier_config.json beside the model); it must not exist.")
@click.option("--fp16", "precision", flag_value="fp16", help="Convert to fp16 (for the CUDA provider).")
@click.option("--int8", "precision", flag_value="int8", help="Dynamic int8 quantization (for the CPU provider).")
@click.option("--no-optimize", is_flag=True, help="Skip ONNX Runtime's graph optimizer.")
@click.option("--max-length", type=click.IntRange(min=8), default=None,
              help="Longest exchange in tokens (default: min(512, the model's positions)).")
@click.option("--unsafe-label", default=None,
              help="Name or index of the unsafe class (default: unsafe_compliance, or 1 for two labels).")
@click.option("--tolerance", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Max |delta probability| against PyTorch (default 1e-4 fp32, 2e-2 fp16/int8).")
@click.option("--max-flip-rate", type=FiniteFloat(0, 1), default=0.02, show_default=True,
              help="Share of parity exchanges whose predicted label may differ from PyTorch.")
@click.option("--json", "as_json", is_flag=True, help="Print classifier_config.json instead of the table.")
@user_errors
def export_classifier(src, out, precision, no_optimize, max_length, unsafe_label, tolerance, max_flip_rate, as_json):
    """Export a Hugging Face sequence classifier (SRC: directory or hub id) to an ONNX directory.

    \b
    ModernBERT, BERT/MiniLM, DeBERTa-v2/v3 and RoBERTa. torch.onnx (dynamo) with sdpa
    attention and dynamic batch and sequence axes, then ONNX Runtime's optimizer, then a
    parity check against PyTorch on real exchanges (../shared/data when present) plus one
    as long as --max-length. Nothing is written unless it passes.
    Examples:
      oc-engine export-classifier ./my-classifier --out ./my-classifier-onnx
      oc-engine export-classifier ./my-classifier --out ./my-classifier-int8 --int8
    """
    from oc_engine.export.onnx_export import ExportOptions
    from oc_engine.export.onnx_export import export_classifier as export

    check_output_dir(out, "--out")
    label = int(unsafe_label) if unsafe_label is not None and unsafe_label.isdigit() else unsafe_label
    options = ExportOptions(precision=precision or "fp32", optimize=not no_optimize, max_length=max_length,
                            tolerance=tolerance, max_flip_rate=max_flip_rate, unsafe_label=label)
    config = export(src, out, options, log=progress_log("oc-engine export-classifier", quiet=as_json))
    click.echo(json.dumps(config, indent=2) if as_json else export_summary(config, Path(out)))


@click.command("train-classifier")
@click.option("--data", "data_specs", multiple=True, metavar="FILE[@SOURCE]",
              help="Labelled JSONL exchanges (repeatable); @SOURCE keeps only rows of that source, "
                   "e.g. gptfuzz_labeled.jsonl@gptfuzz:train.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Hugging Face checkpoint directory to write.")
@click.option("--export", "export_dir", type=click.Path(file_okay=False), default=None,
              help="Also export the trained classifier to this ONNX directory.")
@click.option("--int8", is_flag=True, help="With --export: int8 ONNX (faster on CPU).")
@click.option("--eval", "eval_specs", multiple=True, metavar="FILE[@SOURCE]",
              help="Also report metrics on these labelled files at the calibrated threshold (repeatable).")
@click.option("--default", "build_default", is_flag=True,
              help="Rebuild the default classifier that ships in the package: a LoRA delta over the embedded "
                   "MiniLM, trained on ../shared/data/train and the embedded model's own answers (collected "
                   "once, shared with train-probe --default), then exported into the user cache as generate "
                   "does on first use (GPTFuzz's evaluate questions held out and reported).")
@click.option("--force", is_flag=True, help="With --default: replace the shipped default classifier.")
@click.option("--backbone", default=None,
              help="Hugging Face encoder (default: ModernBERT-base if the hub answers, else the embedded MiniLM).")
@click.option("--binary", is_flag=True, help="Two classes: unsafe_compliance vs the rest.")
@click.option("--epochs", type=FiniteFloat(min=0, max=100, min_open=True), default=1.0, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", "learning_rate", type=FiniteFloat(min=0, min_open=True), default=None,
              help="Peak learning rate [default: 1e-4; 5e-4 with --default].")
@click.option("--lora-rank", type=click.IntRange(min=0), default=None,
              help="Train LoRA adapters of this rank and the head instead of every weight; the checkpoint "
                   "then holds delta/, a few-MB classifier usable as --classifier [default: 0 (full); "
                   "32 with --default].")
@click.option("--long-request-share", type=FiniteFloat(0, 1), default=None,
              help="Share of training and validation requests asked after benign text in the same user turn "
                   "(a system prompt's text or earlier requests), labels kept, so a long request alone does not "
                   "read as harm [default: 0].")
@click.option("--max-length", type=click.IntRange(min=16), default=None,
              help="Tokens of one window a check reads: the request and the answer laid out as a text pair, "
                   "a long one in windows, never cut [default: 512].")
@click.option("--validation", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.15,
              show_default=True, help="Share of prompts held out (split grouped by prompt).")
@click.option("--prefixes", type=click.IntRange(min=0), default=1, show_default=True,
              help="Random response prefixes added per training exchange.")
@click.option("--max-train-rows", type=click.IntRange(min=1), default=None,
              help="Cap on training rows after augmentation (time budget) [default: all; 10000 with --default].")
@click.option("--target-safe-block-rate", type=FiniteFloat(0, 1), default=0.01, show_default=True,
              help="Calibration: the most safe_compliance answers the block threshold may block.")
@seed_option(0)
@click.option("--json", "as_json", is_flag=True, help="Print the training report as JSON.")
@user_errors
def train_classifier(data_specs, out, export_dir, int8, eval_specs, build_default, force, backbone, binary, epochs,
                     batch_size, learning_rate, lora_rank, long_request_share, max_length, validation, prefixes,
                     max_train_rows, target_safe_block_rate, seed, as_json):
    """Fine-tune the exchange classifier on labelled JSONL and calibrate its block threshold.

    \b
    Three classes (safe_compliance, safe_refusal, unsafe_compliance) or --binary; null
    labels are skipped and counted; the split is grouped by prompt; training adds response
    prefixes (the guard judges partial answers) and weights classes by inverse frequency.
    The block threshold maximises unsafe F1 on validation with at most
    --target-safe-block-rate of safe_compliance blocked.
    Examples:
      oc-engine train-classifier --default
      oc-engine train-classifier --data ../shared/data/train/jbb_artifacts.jsonl --out ./clf --export ./clf-onnx
    """
    from oc_engine.training.classifier_pipeline import build

    check_output_dir(out, "--out")
    check_output_dir(export_dir, "--export")
    report = build(data_specs=data_specs, out=out, export_dir=export_dir, int8=int8, eval_specs=eval_specs,
                   build_default=build_default, force=force, backbone=backbone, binary=binary, epochs=epochs,
                   batch_size=batch_size, learning_rate=learning_rate, lora_rank=lora_rank, max_length=max_length,
                   validation=validation, long_request_share=long_request_share,
                   prefixes=prefixes, max_train_rows=max_train_rows, target_safe_block_rate=target_safe_block_rate,
                   seed=seed, quiet=as_json, log=progress_log("oc-engine train-classifier", quiet=as_json))
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        from oc_engine.training.classifier_pipeline import report_markdown

        click.echo(report_markdown(report))


@click.command("calibrate-classifier")
@click.argument("classifier_dir", type=click.Path(file_okay=False))
@click.option("--data", "data_specs", multiple=True, required=True, metavar="FILE[@SOURCE]",
              help="Labelled JSONL exchanges to calibrate on (repeatable).")
@click.option("--target-safe-block-rate", type=FiniteFloat(0, 1), default=0.01, show_default=True)
@click.option("--dry-run", is_flag=True, help="Report the threshold without writing it.")
@json_option("Print the report as JSON.")
@user_errors
def calibrate_classifier(classifier_dir, data_specs, target_safe_block_rate, dry_run, as_json):
    """Recalibrate an exported classifier's block threshold on labelled exchanges.

    \b
    Picks the threshold that maximises unsafe_compliance F1 while blocking at most
    --target-safe-block-rate of safe_compliance, and writes it into classifier_config.json.
    Example:
      oc-engine calibrate-classifier ./clf-onnx --data ../shared/data/train/refusal_direction_completions.jsonl
    """
    from oc_engine.training.classifier_pipeline import recalibrate

    result = recalibrate(classifier_dir, [parse_data_spec(s) for s in data_specs], target_safe_block_rate,
                         write=not dry_run)
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        click.echo(markdown_rows([(k, str(v)) for k, v in result.items()], header=("calibration", "value")))
