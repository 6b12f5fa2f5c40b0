"""`oc-engine calibrate-guard` wiring: validation data, replay inputs, the grid, the plot, the write."""

from __future__ import annotations

import json
from pathlib import Path

from oc_engine.errors import OcEngineError
from oc_engine.jsonl import write_json_file

# Both default builds hold out the prompts whose hash falls below their validation share, with
# seed 0: the classifier 0.15, the probe 0.2. Below 0.15 neither stage trained.
VALIDATION, SEED = 0.15, 0


def run_calibrate_guard(*, model, probe_dir, classifier_dir, data_specs, limit, budgets, max_response_tokens,
                        batch_size, plot, write, progress, log, split: bool = True, context_share: float = 0.0) -> dict:
    import numpy as np

    from oc_engine.models.defaults import require_probe, resolve_classifier
    from oc_engine.models.loading import load_model
    from oc_engine.training.guard_calibration import CachedJudge, StateJudge, calibrate_guard, sounds_dangerous
    from oc_engine.training.guard_eval import replay_traces
    from oc_engine.training.probe_calibration import ALPHAS

    if write and not split:
        raise OcEngineError("--write chooses the defaults from held-out data only: drop --no-split")
    if write and model is not None and classifier_dir is None:
        from oc_engine.models.defaults import default_classifier_delta

        raise OcEngineError(f"--write would change the shipped classifier, which guards the embedded model: copy it "
                            f"and name the copy (cp -r {default_classifier_delta()} ./my-classifier, then "
                            f"--classifier ./my-classifier)")
    loaded = load_model(model, progress=False)
    exchanges, files = validation_exchanges(data_specs, limit, loaded, log, progress, split)
    from oc_engine.training.contexts import renderable_share, with_contexts

    # The probe's states attend to the context (none for a model without a chat template).
    exchanges = with_contexts(exchanges, renderable_share(loaded.tokenizer, context_share, log), SEED)
    probe_path, probe = require_probe(loaded, probe_dir, model is None, log)
    classifier = resolve_classifier(classifier_dir, str(loaded.device), required=True, log=log,
                                    model_is_embedded=model is None)
    reads_states = getattr(classifier, "reads_states", False)
    try:
        from oc_engine.guard.state_reader import check_state_reader

        check_state_reader(classifier, loaded.model, probe.config.layers)
        log(f"replaying {len(exchanges)} validation exchanges through the probe")
        traces, response_ids, *acts = replay_traces(loaded, probe, exchanges, alphas=ALPHAS,
                                                    max_response_tokens=max_response_tokens, batch_size=batch_size,
                                                    progress=progress, keep_states=reads_states)
        judge = StateJudge(classifier, acts[0], response_ids) if reads_states else \
            CachedJudge(classifier, loaded.tokenizer, exchanges, response_ids)
        labels = np.array([e.label for e in exchanges])
        dangerous = np.array([sounds_dangerous(e.source) for e in exchanges])
        report = calibrate_guard(traces, judge, labels, dangerous, budgets, progress=progress)
    finally:
        classifier.close()
    report.update(model=loaded.source, probe=str(probe_path), classifier=str(classifier.path), data=files,
                  validation={"share": VALIDATION, "seed": SEED, "grouped_by": "prompt"} if split else "all rows",
                  max_response_tokens=max_response_tokens, context_share=context_share,
                  behind_context=sum(bool(e.context) for e in exchanges))
    if plot:
        plot_curve(report, plot)
        report["plot"] = str(plot)
    if write and report["chosen"]["without_input_check"] is None:
        report["written"] = None  # the caller says so, after the curve that shows which budget binds
    elif write:
        from oc_engine.models.defaults import EMBEDDED_ENCODER

        named = None if classifier_dir == EMBEDDED_ENCODER else classifier_dir  # the shipped delta
        report["written"] = write_choice(report, probe_path, classifier.path if reads_states else named)
    return report


def validation_exchanges(data_specs, limit, loaded, log, progress, split: bool = True):
    """The held-out exchanges of the given files (default: the default builds' data); every
    exchange without `split` (a dev file to measure on)."""
    import random

    from oc_engine.data import read_exchanges
    from oc_engine.training.classifier_pipeline import default_data_specs
    from oc_engine.training.guard_calibration import sounds_dangerous
    from oc_engine.training.splits import grouped_split

    if not data_specs:
        from oc_engine.training.onpolicy_default import embedded_onpolicy_specs

        data_specs = default_data_specs() + embedded_onpolicy_specs(log, progress, loaded)
    rows = []
    for path, source in data_specs:
        rows += read_exchanges(path, source_filter=source)[0]
    held = grouped_split(rows, lambda e: e.prompt, VALIDATION, SEED)[1] if split else rows
    if limit:  # at most `limit` per label, and as many again of benign prompts that sound dangerous
        groups = {}
        for e in held:
            groups.setdefault((e.label, sounds_dangerous(e.source)), []).append(e)
        held = [e for key in sorted(groups) for e in
                (random.Random(SEED).sample(groups[key], limit) if len(groups[key]) > limit else groups[key])]
    if not held:
        raise OcEngineError("no validation exchanges in the given files")
    return held, [p + (f"@{s}" if s else "") for p, s in data_specs]


def write_choice(report: dict, probe_path: Path, classifier_dir) -> dict:
    """The chosen point (without the input check: streaming is the case the stages must cover)
    into the probe's config (alpha, pause, cadence; warn kept at or below pause) and the
    classifier's (block threshold): the delta's config for a delta, the reader's for a state
    reader, else the export's."""
    from oc_engine.guard.classifier_delta import DELTA_CONFIG, is_delta_dir
    from oc_engine.guard.state_reader import CONFIG_FILE as READER_CONFIG, is_reader_dir
    from oc_engine.models.defaults import default_classifier_delta

    point = report["chosen"]["without_input_check"]
    if point is None:
        raise OcEngineError("no point of the curve fits the budgets: nothing written (raise a budget)")
    probe_file = Path(probe_path) / "probe_config.json"
    probe_config = json.loads(probe_file.read_text())
    trained_warn = probe_config.get("metrics", {}).get("calibration", {}).get("warn", probe_config["warn"])
    probe_config.update(alpha=point["alpha"], pause=point["pause"], every=point["every"],
                        warn=min(trained_warn, point["pause"]))
    probe_config.setdefault("metrics", {})["guard_calibration"] = point
    target = Path(classifier_dir) if classifier_dir else default_classifier_delta()
    classifier_file = target / (DELTA_CONFIG if is_delta_dir(target) else READER_CONFIG if is_reader_dir(target)
                                else "classifier_config.json")
    classifier_config = json.loads(classifier_file.read_text())
    classifier_config.update(block_threshold=point["block"], allow_threshold=point["block"])
    classifier_config["guard_calibration"] = point
    write_json_file(probe_file, probe_config)
    write_json_file(classifier_file, classifier_config)
    return {"probe": str(probe_file), "classifier": str(classifier_file)}


def plot_curve(report: dict, path) -> None:
    """Harmful stopped against benign blocked, one line per input-check setting (the Pareto
    front), the chosen points marked; colour: the share of benign answers escalated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oc_engine.plots import save_figure
    from oc_engine.training.guard_calibration import pareto

    fig, ax = plt.subplots(figsize=(7, 5))
    scatter = None
    for flag, marker in ((False, "o"), (True, "^")):
        points = [p for p in report["curve"] if p["input_check"] == flag]
        scatter = ax.scatter([p["benign_blocked"] for p in points], [p["harmful_stopped"] for p in points],
                             c=[p["benign_escalated"] for p in points], cmap="viridis", vmin=0, vmax=0.5, s=10,
                             marker=marker, alpha=0.5)
        front = pareto(points, "benign_blocked", "harmful_stopped")
        ax.plot([p["benign_blocked"] for p in front], [p["harmful_stopped"] for p in front],
                label=f"best, input check {'on' if flag else 'off'}")
    for name, point in report["chosen"].items():
        if point:
            ax.scatter([point["benign_blocked"]], [point["harmful_stopped"]], s=120, facecolors="none",
                       edgecolors="red")
            ax.annotate(name.replace("_", " "), (point["benign_blocked"], point["harmful_stopped"]), fontsize=8)
    ax.axvline(report["budgets"]["benign_block"], color="grey", linestyle=":", label="benign block budget")
    fig.colorbar(scatter, label="benign answers escalated")
    ax.set_xlabel("benign answers blocked (validation)")
    ax.set_ylabel("harmful answers stopped, streaming (validation)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)
