"""`oc-engine eval` wiring: load the model, probe and classifier, then replay and/or run live."""

from __future__ import annotations

import random

from oc_engine.errors import OcEngineError


def resolve_probe(probe_dir, model_is_embedded: bool, log=lambda m: None):
    """The probe at `probe_dir`, else the shipped default probe with the embedded model, else None."""
    from oc_engine.engine.probe import load_probe
    from oc_engine.training.probe_pipeline import DEFAULT_PROBE_DIR

    if probe_dir is not None:
        return load_probe(probe_dir)
    if model_is_embedded and (DEFAULT_PROBE_DIR / "probe_config.json").is_file():
        log(f"using the default probe shipped for the embedded model ({DEFAULT_PROBE_DIR})")
        return load_probe(DEFAULT_PROBE_DIR)
    return None


def resolve_classifier(classifier_dir, no_classifier: bool, device: str, log=lambda m: None):
    from oc_engine.engine.classifier import ExchangeClassifier
    from oc_engine.engine.embedded import default_classifier_dir

    if no_classifier:
        return None
    if classifier_dir is None:
        default = default_classifier_dir()
        if not (default / "classifier_config.json").is_file():
            return None
        log(f"using the default classifier at {default}")
        classifier_dir = default
    return ExchangeClassifier(classifier_dir, device=device)


def run_eval(*, model, probe_dir, classifier_dir, no_classifier, replay_specs, live_specs, limit, max_new_tokens,
             max_response_tokens, batch_size, plot, seed, progress, log) -> dict:
    from oc_engine.engine.loading import load_model

    if not replay_specs and not live_specs:
        raise OcEngineError("give --replay FILE and/or --live FILE")
    loaded = load_model(model, progress=False)
    probe = resolve_probe(probe_dir, model is None, log)
    if probe is None:
        raise OcEngineError("no probe: give --probe DIR (a default probe ships only for the embedded model)")
    probe.check_model(loaded.model)
    classifier = resolve_classifier(classifier_dir, no_classifier, str(loaded.device), log)
    report = {"model": loaded.source, "probe": probe_dir or "default",
              "classifier": str(classifier.path) if classifier else None,
              "probe_settings": {"layers": list(probe.config.layers), "alpha": probe.config.alpha,
                                 "warn": probe.config.warn, "pause": probe.config.pause}}
    try:
        if replay_specs:
            from oc_engine.training.guard_eval import replay
            from oc_engine.training.probe_pipeline import read_specs

            exchanges = read_specs(replay_specs, limit, seed)
            report["replay"] = replay(loaded, probe, exchanges, classifier, max_response_tokens=max_response_tokens,
                                      batch_size=max(1, batch_size // 2), progress=progress)
            if plot:
                _plot(loaded, probe, exchanges, max_response_tokens, plot)
                report["plot"] = plot
        if live_specs:
            report["live"] = _live(loaded, probe, classifier, live_specs, limit, max_new_tokens, batch_size, seed,
                                   progress)
    finally:
        if classifier is not None:
            classifier.close()
    return report


def _live(loaded, probe, classifier, specs, limit, max_new_tokens, batch_size, seed, progress) -> dict:
    from oc_engine.engine.decode import Engine
    from oc_engine.engine.guard import GuardConfig
    from oc_engine.engine.guarded import GuardMonitor
    from oc_engine.training.guard_eval import live
    from oc_engine.training.onpolicy import read_labelled_prompts

    rows = []
    for path, source in specs:
        found = read_labelled_prompts(path, source_filter=source)
        rows += random.Random(seed).sample(found, limit) if limit and len(found) > limit else found
    engine = Engine(loaded, probe=probe)
    config = GuardConfig(every=probe.config.every)
    return live(engine, lambda prompts: GuardMonitor(loaded.tokenizer, prompts, config, classifier), rows,
                max_new_tokens=max_new_tokens, batch_size=batch_size, progress=progress)


def _plot(loaded, probe, exchanges, max_response_tokens, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from oc_engine.data import LABELS
    from oc_engine.training.activations import CollectSpec, collect
    from oc_engine.training.probe_training import exchange_scores

    points = loaded.model.config.get_text_config().num_hidden_layers + 1
    spec = CollectSpec(layers=tuple(layer % points for layer in probe.config.layers), mode="tokens",
                       max_response_tokens=max_response_tokens)
    acts = collect(loaded.model, loaded.tokenizer, exchanges, spec, progress=False)
    scores = exchange_scores(acts, probe.weight, probe.bias, probe.config.alpha)
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, name in enumerate(LABELS):
        chosen = scores[(acts.labels == i).numpy()]
        if len(chosen):
            ax.hist(chosen, bins=40, range=(0, 1), alpha=0.5, label=f"{name} ({len(chosen)})")
    ax.axvline(probe.config.pause, color="red", linestyle="--", label="pause")
    ax.axvline(probe.config.warn, color="orange", linestyle=":", label="warn")
    ax.set_xlabel("highest EMA over the response")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
