"""`train-reader`: the second stage over the served model's own hidden states."""

from __future__ import annotations

import json

import click

from oc_engine.cli.common import (FiniteFloat, batch_size_option, check_output_dir, dtype_option, json_option,
                                  markdown_rows, model_option, probe_option, progress_log, quantize_option, seed_option,
                                  user_errors)
from oc_engine.training.classifier_pipeline import parse_data_spec


@click.command("train-reader")
@model_option
@dtype_option
@quantize_option
@probe_option("Probe whose tapped layers the reader reads (default: the shipped probe, with the embedded model).")
@click.option("--data", "data_specs", multiple=True, metavar="FILE[@SOURCE]",
              help="Labelled JSONL exchanges (repeatable); @SOURCE keeps rows of that source.")
@click.option("--max-response-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Answer tokens per exchange read in training.")
@click.option("--validation", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.2,
              show_default=True, help="Share of prompts held out (split grouped by prompt).")
@click.option("--max-exchanges", type=click.IntRange(min=1), default=None,
              help="Sample at most this many exchanges per data file (time budget).")
@click.option("--context-share", type=FiniteFloat(0, 1), default=0.3, show_default=True,
              help="Share of exchanges (by prompt) put behind a system prompt or a chat history.")
@batch_size_option
@click.option("--hidden", type=click.IntRange(min=1, max=65536), default=256, show_default=True,
              help="Width of the reader's MLP.")
@click.option("--epochs", type=click.IntRange(min=1, max=10_000), default=30, show_default=True)
@click.option("--target-safe-block-rate", "target", type=FiniteFloat(0, 1, min_open=True, max_open=True),
              default=0.01, show_default=True,
              help="Calibration: the most validation answers that are safe (compliance or refusal) that may block.")
@seed_option(0)
@json_option("Print the report as JSON.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Reader directory to write.")
@click.option("--default", "build_default", is_flag=True,
              help="Build the shipped reader for the embedded model from the default probe's data, split "
                   "and layers (their states are cached by `train-probe --default`).")
@click.option("--force", is_flag=True, help="With --default: replace the shipped reader.")
@user_errors
def train_reader(model, dtype, quantize, probe_dir, data_specs, max_response_tokens, validation, max_exchanges,
                 context_share, batch_size, hidden, epochs, target, seed, as_json, out, build_default, force):
    """Train a state reader: a second stage that judges the exchange from the served model's own
    hidden states, not from the text.

    \b
    It reads the states the probe already taps, pooled over the exchange: the prompt's last
    position (the request as the model understood it, behind any system prompt or history),
    the answer so far and its latest tokens. A check costs well under a millisecond and no
    second model. It belongs to one model (fingerprint), quantization and probe layer set;
    serve it with --classifier DIR (the embedded model's reader is its default).
    Examples:
      oc-engine train-reader --default --force
      oc-engine train-reader --model ./my-model --probe ./probe --data exchanges.jsonl --out ./reader
    """
    from oc_engine.errors import OcEngineError
    from oc_engine.training.probe_pipeline import ProbeJob
    from oc_engine.training.reader_training import ReaderTrainConfig, build_default_reader, train_reader as train

    log = progress_log("oc-engine train-reader", quiet=as_json)
    check_output_dir(out, "--out")
    job = ProbeJob(max_response_tokens=max_response_tokens, validation=validation, batch_size=batch_size,
                   max_exchanges=max_exchanges, seed=seed, context_share=context_share)
    config = ReaderTrainConfig(hidden=hidden, epochs=epochs, target_safe_block_rate=target, seed=seed)
    if build_default:
        if quantize != "none" or model is not None or probe_dir or data_specs or out:
            raise OcEngineError("--default builds the shipped reader for the embedded model from the default "
                                "probe's data: it takes no --model, --quantize, --probe, --data or --out")
        report = build_default_reader(job, config, force=force, log=log, progress=not as_json)
    else:
        from oc_engine.guard.probe import load_probe
        from oc_engine.models.defaults import resolve_probe_dir
        from oc_engine.models.loading import load_model

        if not data_specs or out is None:
            raise OcEngineError("give --data FILE (repeatable) and --out DIR, or --default")
        directory = resolve_probe_dir(probe_dir, model is None, log)
        if directory is None:
            raise OcEngineError("give --probe DIR: the reader reads the layers its probe taps")
        probe = load_probe(directory)
        loaded = load_model(model, dtype=dtype, progress=False, quantize=quantize)
        report = train(loaded, probe, [parse_data_spec(s) for s in data_specs], out, job, config, log=log,
                       progress=not as_json)
    click.echo(json.dumps(report, indent=2) if as_json else _summary(report))


def _summary(report: dict) -> str:
    cal = report["calibration"]
    rows = [("validation AUROC", f"{report['validation_auroc']:.4f}"),
            ("block threshold", f"{cal['block_threshold']:.4f}"),
            ("unsafe answers blocked", f"{cal['unsafe_recall']:.1%}"),
            ("safe answers blocked", f"{cal['safe_block_rate']:.1%} (target {cal['target_safe_block_rate']:.1%})"),
            ("exchanges train / validation", f"{report['train_exchanges']} / {report['validation_exchanges']}"),
            ("written to", report.get("out", "-")), ("seconds", str(report["seconds"]))]
    return markdown_rows(rows, header=("reader", "value"))
