"""`calibrate-guard`: choose the probe's and the classifier's thresholds together."""

from __future__ import annotations

import json

import click

from oc_engine.cli.common import (PLOT_SUFFIXES, FiniteFloat, batch_size_option, check_output_file, classifier_option,
                                       json_option, model_option, out_option, probe_option, progress_log,
                                       user_errors, write_json)
from oc_engine.errors import OcEngineError
from oc_engine.training.classifier_pipeline import parse_data_spec


@click.command("calibrate-guard")
@model_option
@probe_option()
@classifier_option()
@click.option("--data", "data_specs", multiple=True, metavar="FILE[@SOURCE]",
              help="Labelled exchanges (repeatable); their held-out prompts are used. Default: the data of "
                   "the default builds (../shared/data/train and the embedded model's own answers).")
@click.option("--benign-block-budget", type=FiniteFloat(0, 1), default=0.05, show_default=True,
              help="Most safe_compliance answers the chosen point may block (with the final check).")
@click.option("--dangerous-benign-block-budget", type=FiniteFloat(0, 1), default=0.1, show_default=True,
              help="Most of those whose prompts sound dangerous (contrast, topic-matched, twins) it may block.")
@click.option("--refusal-block-budget", type=FiniteFloat(0, 1), default=0.02, show_default=True,
              help="Most safe_refusal answers it may block.")
@click.option("--escalation-budget", type=FiniteFloat(0, 1), default=0.25, show_default=True,
              help="Most safe_compliance answers on which the probe may pause (each costs a classifier call).")
@click.option("--limit", type=click.IntRange(min=1), default=None,
              help="At most this many validation exchanges per label (time budget).")
@click.option("--max-response-tokens", type=click.IntRange(min=1), default=64, show_default=True)
@click.option("--context-share", type=FiniteFloat(0, 1), default=0.3, show_default=True,
              help="Share of exchanges (by prompt) replayed behind a system prompt or a chat history, as real "
                   "traffic has them (the probe's states attend to them).")
@batch_size_option
@click.option("--plot", default=None, type=click.Path(dir_okay=False), help="Write the curve (PNG or SVG).")
@click.option("--no-split", is_flag=True,
              help="Use every exchange of --data, not only the held-out prompts: to measure the curve on a dev "
                   "file (never to choose the defaults: refused with --write).")
@click.option("--write", is_flag=True,
              help="Write the chosen alpha and pause into the probe's config and the block threshold into the "
                   "classifier's (the shipped ones by default).")
@out_option()
@json_option("Print the report (with the whole curve) as JSON.")
@user_errors
def calibrate_guard(model, probe_dir, classifier_dir, data_specs, benign_block_budget, dangerous_benign_block_budget,
                    refusal_block_budget, escalation_budget, limit, max_response_tokens, context_share, batch_size, plot,
                    no_split, write, out, as_json):
    """Calibrate probe and classifier together on held-out exchanges replayed through the policy.

    \b
    Every point of a grid (EMA alpha, pause threshold, cadence, block threshold, input check
    on/off) is replayed token by token through the guard policy, with the classifier asked
    about each partial answer a pause covers. Reported: harmful answers stopped, benign answers
    blocked (all, and those whose prompts sound dangerous), refusals blocked, benign answers
    escalated (paused) and the checks each costs; streamed and with the final check. The chosen
    point stops the most harmful answers while streaming within every budget.
    Example (about 10 minutes on a 2-core CPU):
      oc-engine calibrate-guard --plot guard-curve.png
    """
    from oc_engine.training.guard_calibration import Budgets
    from oc_engine.training.guard_calibration_pipeline import run_calibrate_guard

    check_output_file(out, "--out")
    check_output_file(plot, "--plot", PLOT_SUFFIXES)
    budgets = Budgets(benign_block=benign_block_budget, dangerous_benign_block=dangerous_benign_block_budget,
                      refusal_block=refusal_block_budget, escalation=escalation_budget)
    report = run_calibrate_guard(model=model, probe_dir=probe_dir, classifier_dir=classifier_dir,
                                 data_specs=[parse_data_spec(s) for s in data_specs], limit=limit, budgets=budgets,
                                 max_response_tokens=max_response_tokens, batch_size=batch_size, plot=plot,
                                 write=write, split=not no_split, progress=not as_json, context_share=context_share,
                                 log=progress_log("oc-engine calibrate-guard", quiet=as_json))
    write_json(out, report)
    click.echo(json.dumps(report, indent=2) if as_json else calibration_markdown(report))
    if write and report["written"] is None:
        raise OcEngineError("no point of the curve fits the budgets: nothing written (raise a budget; --out and "
                            "--plot show the curve)")


def calibration_markdown(report: dict) -> str:
    lines = [f"{report['exchanges']} held-out exchanges ({report['groups']}); "
             f"{report['checks_asked']} distinct classifier checks; budgets {report['budgets']}", "",
             "| point | alpha | pause | every | block | harmful stopped | benign blocked (sounding dangerous) | "
             "refusals blocked | benign escalated (checks each) | harmful reaching the classifier | "
             "with the final check: harmful stopped / benign (sounding dangerous) / refusals blocked |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, p in report["chosen"].items():
        if p is None:
            lines.append(f"| {name.replace('_', ' ')} | no point fits the budgets ||||||||||")
            continue
        lines.append(f"| {name.replace('_', ' ')} | {p['alpha']} | {p['pause']:.4f} | {p['every']} | "
                     f"{p['block']:.3f} | {p['harmful_stopped']:.1%} | {p['benign_blocked']:.1%} "
                     f"({p['dangerous_benign_blocked']:.1%}) | {p['refusals_blocked']:.1%} | "
                     f"{p['benign_escalated']:.1%} ({p['checks_per_escalated_benign']:.1f}) | "
                     f"{p['harmful_reach']:.1%} | {p['harmful_stopped_final']:.1%} / "
                     f"{p['benign_blocked_final']:.1%} ({p['dangerous_benign_blocked_final']:.1%}) / "
                     f"{p['refusals_blocked_final']:.1%} |")
    if "plot" in report:
        lines += ["", f"curve: {report['plot']}"]
    if report.get("written"):
        lines += ["", f"written: {report['written']['probe']}, {report['written']['classifier']}"]
    return "\n".join(lines)
