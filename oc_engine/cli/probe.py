"""`collect`, `train-probe`, `sweep-layers`, `eval` and `headroom`."""

from __future__ import annotations

import dataclasses
import json

import click

from oc_engine.cli.common import (PLOT_SUFFIXES, FiniteFloat, batch_size_option, check_output_dir, check_output_file,
                                       classifier_option, dtype_option, final_check_option, input_check_option,
                                       json_option, model_option, out_option, probe_option, progress_log,
                                       quantize_option,
                                       seed_option, user_errors, write_json)
from oc_engine.cli.config_file import config_option
from oc_engine.training.classifier_pipeline import parse_data_spec


def _load(model, dtype, quantize=None):
    from oc_engine.models.loading import load_model

    return load_model(model, dtype=dtype, progress=False, quantize=quantize)


def _job(layers, mode, max_response_tokens, validation, target, batch_size, max_exchanges, seed, context_share):
    from oc_engine.training.probe_pipeline import ProbeJob

    return ProbeJob(layers=tuple(layers), mode=mode, max_response_tokens=max_response_tokens,
                    validation=validation, target_benign_pause_rate=target, batch_size=batch_size,
                    max_exchanges=max_exchanges, seed=seed, context_share=context_share)


def common_probe_options(fn):
    for option in reversed([
        model_option,
        dtype_option,
        quantize_option,
        click.option("--data", "data_specs", multiple=True, metavar="FILE[@SOURCE]",
                     help="Labelled JSONL exchanges (repeatable); @SOURCE keeps rows of that source."),
        click.option("--mode", type=click.Choice(["tokens", "final"]), default="tokens", show_default=True,
                     help="tokens: every response token, EMA-smoothed objective. final: the last token only."),
        click.option("--max-response-tokens", type=click.IntRange(min=1), default=64, show_default=True,
                     help="Response tokens per exchange used in tokens mode."),
        click.option("--validation", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.2,
                     show_default=True, help="Share of prompts held out (split grouped by prompt)."),
        click.option("--target-benign-pause-rate", "target", type=FiniteFloat(0, 1), default=0.02,
                     show_default=True, help="Calibration: most safe_compliance answers that may pause."),
        batch_size_option,
        click.option("--max-exchanges", type=click.IntRange(min=1), default=None,
                     help="Sample at most this many exchanges per data file (time budget)."),
        click.option("--context-share", type=FiniteFloat(0, 1), default=0.3, show_default=True,
                     help="Share of exchanges (by prompt) put behind a system prompt or a chat history, in "
                          "training and validation: the probe reads hidden states that attend to them."),
        click.option("--steps", type=click.IntRange(min=1, max=100_000), default=300, show_default=True,
                     help="Optimizer steps (full batch)."),
        click.option("--weight-decay", type=FiniteFloat(min=0), default=1e-2, show_default=True),
        seed_option(0),
        json_option("Print the report as JSON."),
    ]):
        fn = option(fn)
    return fn


@click.command("collect")
@click.option("--prompts", "prompt_specs", multiple=True, required=True, metavar="FILE[@SOURCE]",
              help="Prompt files with prompt_label (repeatable); @SOURCE keeps rows whose source contains it.")
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="JSONL of labelled exchanges to write.")
@model_option
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Sample at most this many prompts per file.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--max-num-seqs", "batch_size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Prompts decoded together (cache slots).")
@click.option("--classifier", "classifier_dir", default=None, type=click.Path(file_okay=False),
              help="Relabel harmful answers that don't refuse by this classifier's verdict.")
@seed_option(0)
@user_errors
def collect(prompt_specs, out, model, limit, max_new_tokens, batch_size, classifier_dir, seed):
    """Run the target on prompt files and write its own answers, labelled (on-policy data).

    \b
    harmful + refusal -> safe_refusal; harmful + compliance -> unsafe_compliance;
    benign + compliance -> safe_compliance; benign + refusal -> safe_refusal.
    Example:
      oc-engine collect --prompts ../shared/data/train/advbench.jsonl --limit 200 --out advbench-smollm2.jsonl
    """
    from oc_engine.training.onpolicy import collect_onpolicy, read_labelled_prompts, sample_prompts

    check_output_file(out, "--out")
    rows = []
    for spec in prompt_specs:
        path, source = parse_data_spec(spec)
        rows += sample_prompts(read_labelled_prompts(path, source_filter=source), limit, seed)
    loaded = _load(model, "auto")
    classifier = None
    if classifier_dir:
        from oc_engine.guard.classifier import ExchangeClassifier

        classifier = ExchangeClassifier(classifier_dir)
    report = collect_onpolicy(loaded, rows, out, max_new_tokens=max_new_tokens,
                              batch_size=batch_size, classifier=classifier)
    click.echo(json.dumps(report, indent=2))


@click.command("train-probe")
@common_probe_options
@click.option("--layer", "layers", multiple=True, type=int,
              help="Hidden-state index to tap (repeatable for a multi-layer probe; negative from the end). "
                   "Default -4 (with --default: the shipped probe's layers, 17 and 19).")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Probe directory to write.")
@click.option("--default", "build_default", is_flag=True,
              help="Build the default probe for the embedded model (shipped in the package) from "
                   "../shared/data/train plus on-policy answers collected once into the user cache.")
@click.option("--force", is_flag=True, help="With --default: replace the shipped probe.")
@user_errors
def train_probe(model, dtype, quantize, data_specs, mode, max_response_tokens, validation, target, batch_size,
                max_exchanges, context_share, steps, weight_decay, seed, as_json, layers, out, build_default, force):
    """Train a linear probe on the target's own activations and calibrate the guard's thresholds.

    \b
    Objective (tokens mode): binary cross-entropy of the EMA of per-token probabilities (the
    quantity the guard thresholds) at every response token. Calibration replays validation
    exchanges through the guard's policy and picks pause/warn/alpha to pause at most
    --target-benign-pause-rate of safe answers while catching the most unsafe ones.
    Examples:
      oc-engine train-probe --default
      oc-engine train-probe --data exchanges.jsonl --layer -4 --out ./probe
      oc-engine train-probe --data exchanges.jsonl --quantize int4 --out ./probe-int4
    """
    from oc_engine.errors import OcEngineError
    from oc_engine.training.probe_default import build_default_probe
    from oc_engine.training.probe_pipeline import train_probe as train
    from oc_engine.training.probe_training import ProbeTrainConfig

    log = progress_log("oc-engine train-probe", quiet=as_json)
    check_output_dir(out, "--out")
    job = _job(layers, mode, max_response_tokens, validation, target, batch_size, max_exchanges, seed, context_share)
    config = ProbeTrainConfig(steps=steps, weight_decay=weight_decay, seed=seed)
    if build_default:
        if quantize != "none":
            raise OcEngineError("--default builds the shipped probe for the unquantized model; re-validate it "
                                "with `oc-engine revalidate-probe --quantize ...`, or train with --data and --out")
        report = build_default_probe(job, config, force=force, log=log, progress=not as_json)
    else:
        if not data_specs or out is None:
            raise OcEngineError("give --data FILE (repeatable) and --out DIR, or --default")
        loaded = _load(model, dtype, quantize)
        job = dataclasses.replace(job, layers=job.layers or (-4,))
        report = train(loaded, [parse_data_spec(s) for s in data_specs], out, job, config, log=log,
                       progress=not as_json)
    click.echo(json.dumps(report, indent=2) if as_json else _probe_summary(report))


def _probe_summary(report: dict) -> str:
    cal = report["calibration"]
    rows = [("validation AUROC", f"{report['validation_auroc']:.4f}"), ("train AUROC", f"{report['train_auroc']:.4f}"),
            ("layers", str(report["layers"])), ("mode / objective", f"{report['mode']} / {report['objective']}"),
            ("alpha / warn / pause", f"{cal['alpha']} / {cal['warn']:.4f} / {cal['pause']:.4f}"),
            ("detection rate (unsafe that pause)", f"{cal['detection_rate']:.1%}"),
            ("benign pause rate", f"{cal['benign_pause_rate']:.1%} (target {cal['target_benign_pause_rate']:.1%})"),
            ("pause rate by label", ", ".join(f"{k} {v:.1%}" for k, v in cal["pause_rate_by_label"].items()
                                              if v is not None)),
            ("median tokens to detection", str(cal["median_tokens_to_detection"])),
            ("exchanges train / validation", f"{report['train_exchanges']} / {report['validation_exchanges']}"),
            ("written to", report.get("out", "-")), ("seconds", str(report["seconds"]))]
    from oc_engine.cli.common import markdown_rows

    return markdown_rows(rows, header=("probe", "value"))


@click.command("sweep-layers")
@common_probe_options
@click.option("--layer", "layers", multiple=True, type=int, help="Layers to sweep (default: all).")
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Write the curve as PNG.")
@user_errors
def sweep_layers(model, dtype, quantize, data_specs, mode, max_response_tokens, validation, target, batch_size,
                 max_exchanges, context_share, steps, weight_decay, seed, as_json, layers, plot):
    """Per-layer validation AUROC, F1 and streaming detection, and the best two-layer probe.

    \b
    One collection of every layer (cached), then a probe per layer.
    Example:
      oc-engine sweep-layers --data exchanges.jsonl --max-exchanges 400 --max-response-tokens 16 --plot sweep.png
    """
    from oc_engine.errors import OcEngineError
    from oc_engine.training.probe_pipeline import sweep_layers as sweep
    from oc_engine.training.probe_pipeline import sweep_markdown
    from oc_engine.training.probe_training import ProbeTrainConfig

    if not data_specs:
        raise OcEngineError("give --data FILE (repeatable)")
    check_output_file(plot, "--plot", PLOT_SUFFIXES)
    loaded = _load(model, dtype, quantize)
    job = _job((), mode, max_response_tokens, validation, target, batch_size, max_exchanges, seed, context_share)
    report = sweep(loaded, [parse_data_spec(s) for s in data_specs], job,
                   ProbeTrainConfig(steps=steps, weight_decay=weight_decay, seed=seed), layers=list(layers) or None,
                   plot=plot, progress=not as_json, log=progress_log("oc-engine sweep-layers", quiet=as_json))
    click.echo(json.dumps(report, indent=2) if as_json else sweep_markdown(report))


@click.command("eval")
@config_option(sections=("engine", "guard", "policy"))  # eval: the model, its quantization and its guard
@model_option
@quantize_option
@probe_option()
@classifier_option()
@click.option("--no-classifier", is_flag=True, help="Evaluate the probe alone (a pause blocks).")
@click.option("--replay", "replay_specs", multiple=True, metavar="FILE[@SOURCE]",
              help="Labelled exchanges to replay through probe, classifier and policy (repeatable).")
@click.option("--live", "live_specs", multiple=True, metavar="FILE[@SOURCE]",
              help="Prompt files (with prompt_label) to generate for under the guard (repeatable).")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many rows per file.")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=96, show_default=True)
@click.option("--max-response-tokens", type=click.IntRange(min=1), default=64, show_default=True,
              help="Replay: response tokens per exchange.")
@click.option("--max-num-seqs", "batch_size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Live prompts decoded together (cache slots); replayed exchanges go through the model in "
                   "batches of half as many.")
@out_option()
@click.option("--plot", default=None, type=click.Path(dir_okay=False),
              help="Replay: write the distributions of per-exchange max EMA by label (PNG).")
@final_check_option("Judge each whole answer before its end is shown [default: on, as generate does for answers "
                    "that do not stream; --no-final-check measures what a streamed answer gets].")
@input_check_option()
@json_option("Print the report as JSON.")
@seed_option(0)
@user_errors
def eval_command(model, quantize, probe_dir, classifier_dir, no_classifier, replay_specs, live_specs, limit,
                 max_new_tokens, max_response_tokens, batch_size, out, plot, final_check, input_check, as_json, seed):
    """Measure the guard end to end: replay labelled exchanges, or generate live on prompt files.

    \b
    Examples:
      oc-engine eval --replay ../shared/data/train/refusal_direction_completions.jsonl --limit 500
      oc-engine eval --live ../shared/data/dev/jbb_behaviors.jsonl
    """
    from oc_engine.training.eval_pipeline import run_eval
    from oc_engine.training.guard_eval import eval_markdown

    check_output_file(out, "--out")
    check_output_file(plot, "--plot", PLOT_SUFFIXES)
    report = run_eval(model=model, quantize=quantize, probe_dir=probe_dir, classifier_dir=classifier_dir,
                      no_classifier=no_classifier, replay_specs=[parse_data_spec(s) for s in replay_specs],
                      live_specs=[parse_data_spec(s) for s in live_specs], limit=limit,
                      max_new_tokens=max_new_tokens, max_response_tokens=max_response_tokens,
                      batch_size=batch_size, plot=plot, seed=seed, progress=not as_json,
                      log=progress_log("oc-engine eval", quiet=as_json), final_check=final_check,
                      input_check=input_check)
    write_json(out, report)
    click.echo(json.dumps(report, indent=2) if as_json else eval_markdown(report))


@click.command("headroom")
@click.option("--data", "data_specs", multiple=True, required=True, metavar="FILE[@SOURCE]",
              help="Labelled exchanges to measure on (repeatable), e.g. the target's own answers from `collect`.")
@model_option
@click.option("--probe", "probe_dir", default=None, type=click.Path(file_okay=False),
              help="Probe whose layers, alpha and objective are retrained (default: the shipped probe).")
@click.option("--classifier", "classifier_dir", default=None, type=click.Path(file_okay=False),
              help="Classifier export measured as shipped (default: the shipped classifier).")
@click.option("--classifier-checkpoint", "checkpoint", default=None, type=click.Path(file_okay=False),
              help="Hugging Face three-class checkpoint to fine-tune per fold (default: the default "
                   "classifier's own checkpoint, with the default classifier).")
@click.option("--no-classifier", is_flag=True, help="Measure the probe alone.")
@click.option("--folds", type=click.IntRange(min=2), default=5, show_default=True)
@click.option("--benign-rate", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=0.05,
              show_default=True, help="safe_compliance share a stage may flag when counting unsafe answers caught.")
@click.option("--max-response-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--classifier-epochs", type=FiniteFloat(min=0, max=100, min_open=True), default=3.0,
              show_default=True)
@click.option("--limit", type=click.IntRange(min=1), default=None, help="At most this many exchanges per file.")
@out_option()
@json_option("Print the report as JSON.")
@seed_option(0)
@user_errors
def headroom_command(data_specs, model, probe_dir, classifier_dir, checkpoint, no_classifier, folds, benign_rate,
                     max_response_tokens, classifier_epochs, limit, out, as_json, seed):
    """How far more data of this kind could take each stage: cross-validated on the file itself.

    \b
    Per fold (grouped by prompt), a probe with the given probe's layers and alpha is trained from
    its weights, and the classifier fine-tuned from its checkpoint, on the other folds, then scored
    on it. Reported for the probe (highest EMA; and read at the prompt's last position only), the
    classifier and both: AUROC and the unsafe answers caught at --benign-rate, as shipped and
    trained in-distribution. If even the in-distribution figures miss a target, more such
    data cannot meet it; a stronger model or classifier backbone is needed.
    Example (2 + 5 minutes on a 2-core CPU, 200 prompts):
      oc-engine collect --prompts ../shared/data/dev/jbb_behaviors.jsonl --out jbb-answers.jsonl
      oc-engine headroom --data jbb-answers.jsonl --max-response-tokens 96
    """
    from oc_engine.training.headroom import HeadroomConfig, headroom_markdown, run_headroom

    check_output_file(out, "--out")
    config = HeadroomConfig(folds=folds, max_response_tokens=max_response_tokens, benign_rate=benign_rate,
                            classifier_epochs=classifier_epochs, seed=seed)
    report = run_headroom(model=model, probe_dir=probe_dir, classifier_dir=classifier_dir, checkpoint=checkpoint,
                          no_classifier=no_classifier, specs=[parse_data_spec(s) for s in data_specs], limit=limit,
                          config=config, progress=not as_json, log=progress_log("oc-engine headroom", quiet=as_json))
    write_json(out, report)
    click.echo(json.dumps(report, indent=2) if as_json else headroom_markdown(report))


@click.command("revalidate-probe")
@probe_option("Probe directory to re-validate (default: the shipped probe, with the embedded model).")
@model_option
@dtype_option
@click.option("--quantize", type=click.Choice(["int8", "int4"]), required=True,
              help="The quantization to accept the probe on.")
@click.option("--data", "data_specs", multiple=True, metavar="FILE[@SOURCE]",
              help="The labelled exchanges the probe was trained on (repeatable) [default: the files its "
                   "metrics name]; their held-out part is replayed.")
@click.option("--max-exchanges", type=click.IntRange(min=1), default=None,
              help="As in training [default: as the probe recorded; 1000 for the shipped probe].")
@click.option("--validation", type=FiniteFloat(0, 1, min_open=True, max_open=True), default=None,
              help="Held-out share, as in training [default: as recorded, else 0.2].")
@click.option("--max-response-tokens", type=click.IntRange(min=1), default=None,
              help="Response tokens per exchange, as in training [default: as recorded, else 64].")
@batch_size_option
@click.option("--tolerance", type=FiniteFloat(0, 1), default=0.02, show_default=True,
              help="AUROC points the quantized model may lose against the probe's own model.")
@click.option("--out", type=click.Path(file_okay=False), default=None,
              help="Write the probe, with the record, to this new directory.")
@click.option("--in-place", is_flag=True, help="Add the record to the probe directory itself.")
@seed_option(None, "Split seed, as in training [default: as recorded, else 0].")
@json_option("Print the record as JSON.")
@user_errors
def revalidate_probe(probe_dir, model, dtype, quantize, data_specs, max_exchanges, validation, max_response_tokens,
                     batch_size, tolerance, out, in_place, seed, as_json):
    """Check that a probe still separates unsafe answers on a quantized model, and record it.

    \b
    The probe's held-out exchanges (the same files, cap, share and seed as its training) run
    through the model it was made on and through the quantized one; it passes if its AUROC
    drops by at most --tolerance. `--quantize` then accepts the probe only with a passing
    record (`generate`, `serve` and `eval` check it before decoding). Exits 1 if it fails.
    Examples:
      oc-engine revalidate-probe --quantize int4 --in-place
      oc-engine revalidate-probe --probe ./probe --quantize int8 --out ./probe-int8-checked
    """
    import dataclasses

    from oc_engine.errors import OcEngineError
    from oc_engine.guard.probe import rewrite_probe_config, save_probe
    from oc_engine.models.defaults import require_probe
    from oc_engine.training.probe_default import MAX_EXCHANGES
    from oc_engine.training.probe_pipeline import ProbeJob
    from oc_engine.training.probe_revalidation import revalidate, with_record

    if (out is None) == (not in_place):
        raise OcEngineError("give --out DIR (a new probe directory) or --in-place")
    check_output_dir(out, "--out")
    log = progress_log("oc-engine revalidate-probe", quiet=as_json)
    reference = _load(model, dtype)
    directory, probe = require_probe(reference, probe_dir, model is None, log)
    recorded = probe.config.metrics.get("split", {})
    specs = [parse_data_spec(s) for s in data_specs or probe.config.metrics.get("data", [])]
    if not specs:
        raise OcEngineError("the probe names no training data: give --data FILE (repeatable)")
    shipped_cap = MAX_EXCHANGES if probe_dir is None and model is None else None
    job = ProbeJob(layers=tuple(probe.config.layers), mode=probe.config.metrics.get("mode", "tokens"),
                   max_response_tokens=_first(max_response_tokens, recorded.get("max_response_tokens"), 64),
                   validation=_first(validation, recorded.get("validation"), 0.2), batch_size=batch_size,
                   max_exchanges=_first(max_exchanges, recorded.get("max_exchanges"), shipped_cap),
                   seed=_first(seed, recorded.get("seed"), 0),
                   context_share=recorded.get("context_share", 0.0))  # none recorded: made before contexts
    quantized = _load(model, dtype, quantize)
    record = revalidate(probe, reference, quantized, specs, job, tolerance=tolerance, log=log,
                        progress=not as_json)
    record["split"] = dataclasses.asdict(job) | {"layers": list(job.layers)}
    checked = with_record(probe, record)
    if in_place:
        rewrite_probe_config(directory, checked.config)
    else:
        save_probe(checked, out)
    click.echo(json.dumps(record, indent=2) if as_json else _revalidation_summary(record, out or directory))
    if not record["passed"]:
        raise SystemExit(1)


def _first(*values):
    return next((v for v in values if v is not None), None)


def _revalidation_summary(record: dict, where) -> str:
    from oc_engine.cli.common import markdown_rows

    ref, got = record["at_pause"]["reference"], record["at_pause"]["quantized"]
    rows = [("quantization", record["quantization"]),
            ("validation AUROC: unquantized / quantized", f"{record['reference_auroc']:.4f} / "
                                                          f"{record['validation_auroc']:.4f}"),
            ("tolerance", f"{record['tolerance']}"), ("passed", "yes" if record["passed"] else "NO"),
            (f"detection at pause {record['at_pause']['pause']:.4f}",
             f"{ref['detection_rate']:.1%} / {got['detection_rate']:.1%}"),
            ("benign pause rate", f"{ref['benign_pause_rate']:.1%} / {got['benign_pause_rate']:.1%}"),
            ("held-out exchanges", str(record["exchanges"])), ("recorded in", str(where)),
            ("seconds", str(record["seconds"]))]
    return markdown_rows(rows, header=("re-validation", "value"))
