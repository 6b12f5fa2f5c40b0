"""`oc-engine eval` wiring: load the model, probe and classifier, then replay and/or run live."""

from __future__ import annotations

import random

from oc_engine.errors import OcEngineError


def run_eval(*, model, probe_dir, classifier_dir, no_classifier, replay_specs, live_specs, limit, max_new_tokens,
             max_response_tokens, batch_size, plot, seed, progress, log, final_check=None, input_check=None,
             quantize: str | None = None) -> dict:
    from oc_engine.models.defaults import require_probe, resolve_classifier
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.models.loading import load_model

    from oc_engine.training.probe_pipeline import read_specs

    if not replay_specs and not live_specs:
        raise OcEngineError("give --replay FILE and/or --live FILE")
    # The data files are read (and any bad line reported) before the model loads.
    exchanges = read_specs(replay_specs, limit, seed) if replay_specs else []
    live_rows = _live_rows(live_specs, limit, seed) if live_specs else []
    loaded = load_model(model, progress=False, quantize=quantize)
    _, probe = require_probe(loaded, probe_dir, model is None, log)
    classifier = None if no_classifier else resolve_classifier(classifier_dir, str(loaded.device), log=log,
                                                                    model_is_embedded=model is None,
                                                                    quantized=loaded.quantization is not None)
    if classifier is not None:
        from oc_engine.guard.state_reader import check_state_reader

        check_state_reader(classifier, loaded.model, probe.config.layers,
                           None if input_check is None else GuardConfig(input_check=input_check))
    report = {"model": loaded.source, "quantization": loaded.quantization, "probe": probe_dir or "default",
              "classifier": str(classifier.path) if classifier else None,
              "probe_settings": {"layers": list(probe.config.layers), "alpha": probe.config.alpha,
                                 "warn": probe.config.warn, "pause": probe.config.pause}}

    # What `generate` does for answers that do not stream: the final check on (with a classifier).
    guard = GuardConfig(every=probe.config.every, final_check=final_check,
                        **({} if input_check is None else {"input_check": input_check}))
    resolved = guard.for_request(streaming=False, has_classifier=classifier is not None)
    report["guard"] = {"final_check": resolved.final_check, "input_check": resolved.input_check}
    try:
        if replay_specs:
            from oc_engine.training.guard_eval import replay

            report["replay"], outcomes = replay(loaded, probe, exchanges, classifier, guard_config=resolved,
                                                max_response_tokens=max_response_tokens,
                                                batch_size=max(1, batch_size // 2), progress=progress)
            if plot:
                _plot(probe, [e.label for e in exchanges], [o["peak_ema"] for o in outcomes], plot)
                report["plot"] = plot
        if live_specs:
            report["live"] = _live(loaded, probe, classifier, guard, live_rows, max_new_tokens, batch_size, progress)
    finally:
        if classifier is not None:
            classifier.close()
    return report


def _live_rows(specs, limit, seed) -> list:
    from oc_engine.training.onpolicy import read_labelled_prompts

    rows = []
    for path, source in specs:
        found = read_labelled_prompts(path, source_filter=source)
        rows += random.Random(seed).sample(found, limit) if limit and len(found) > limit else found
    return rows


def _live(loaded, probe, classifier, guard, rows, max_new_tokens, batch_size, progress) -> dict:
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM
    from oc_engine.params import SamplingParams
    from oc_engine.training.guard_eval import live

    # The same LLM and guard defaults as `generate` (non-streaming: the final check is on by default).
    llm = LLM(loaded, EngineConfig(max_num_seqs=max(1, min(batch_size, len(rows)))),
              GuardSetup(probe=probe, classifier=classifier, policy=guard))
    llm.fit([r.request for r in rows], SamplingParams(max_tokens=max_new_tokens))
    return live(llm, rows, max_new_tokens=max_new_tokens, progress=progress)


def _plot(probe, labels: list[int], peaks: list[float], path) -> None:
    """Histograms of each replayed answer's highest EMA, by label, with the thresholds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oc_engine.data import LABELS

    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(LABELS):
        chosen = [peak for peak, label in zip(peaks, labels) if label == i]
        if chosen:
            ax.hist(chosen, bins=40, range=(0, 1), alpha=0.5, label=f"{name} ({len(chosen)})")
    ax.axvline(probe.config.pause, color="red", linestyle="--", label="pause")
    ax.axvline(probe.config.warn, color="orange", linestyle=":", label="warn")
    ax.set_xlabel("highest EMA over the response")
    ax.legend()
    fig.tight_layout()
    from oc_engine.plots import save_figure

    save_figure(fig, path)
