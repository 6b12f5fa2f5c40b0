"""The probe workflow behind the CLI: train-probe, sweep-layers and the default probe build."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from oc_engine.data import UNSAFE, Exchange, read_exchanges
from oc_engine.errors import OcEngineError
from oc_engine.training.contexts import renderable_share
from oc_engine.training.splits import grouped_split


@dataclass(frozen=True)
class ProbeJob:
    layers: tuple[int, ...] = (-4,)
    mode: str = "tokens"
    max_response_tokens: int = 64
    validation: float = 0.2
    target_benign_pause_rate: float = 0.02
    batch_size: int = 8
    max_exchanges: int | None = None  # per data file, sampled (time budget)
    seed: int = 0
    context_share: float = 0.0  # exchanges put behind a system prompt or a chat (training/contexts)


def read_specs(specs: list[tuple[str, str | None]], limit: int | None, seed: int) -> list[Exchange]:
    import random

    rows = []
    for path, source in specs:
        exchanges, _ = read_exchanges(path, source_filter=source)
        if limit is not None and len(exchanges) > limit:
            exchanges = random.Random(seed).sample(exchanges, limit)
        rows += exchanges
    if not rows:
        raise OcEngineError("no labelled exchanges in the given files")
    return rows


def split_exchanges(rows: list[Exchange], validation: float, seed: int,
                    context_share: float = 0.0) -> tuple[list[Exchange], list[Exchange]]:
    """(train, validation) grouped by prompt; `context_share` of each put behind a context."""
    from oc_engine.training.contexts import with_contexts

    train, held = grouped_split(rows, lambda e: e.prompt, validation, seed)
    train, held = with_contexts(train, context_share, seed), with_contexts(held, context_share, seed)
    if not held or not any(e.label == UNSAFE for e in held) or not any(e.label == 0 for e in held):
        raise OcEngineError("the validation split needs unsafe_compliance and safe_compliance exchanges; "
                            "add data or raise --validation")
    return train, held


def collect_split(loaded, specs, job: ProbeJob, layers, *, progress: bool, log):
    """(layers normalised, train activations, validation activations) for the data in `specs`."""
    from oc_engine.training.activations import CollectSpec, collect, normalize_layers

    layers = normalize_layers(layers, loaded.model.config.get_text_config().num_hidden_layers)
    spec = CollectSpec(layers=layers, mode=job.mode, max_response_tokens=job.max_response_tokens)
    train, held = split_exchanges(read_specs(specs, job.max_exchanges, job.seed), job.validation, job.seed,
                                  renderable_share(loaded.tokenizer, job.context_share, log))
    log(f"{len(train)} training and {len(held)} validation exchanges (split by prompt; "
        f"{sum(bool(e.context) for e in train + held)} behind a system prompt or a chat); layers {list(layers)}, "
        f"mode {job.mode}")
    return (layers, collect(loaded.model, loaded.tokenizer, train, spec, batch_size=job.batch_size, progress=progress),
            collect(loaded.model, loaded.tokenizer, held, spec, batch_size=job.batch_size, progress=progress))


def train_probe(loaded, specs: list[tuple[str, str | None]], out: str | Path | None, job: ProbeJob, train_config,
                *, log: Callable[[str], None] = lambda m: None, progress: bool = True) -> dict:
    """Collect, fit, evaluate and calibrate; writes the probe directory to `out` (if given)."""
    from oc_engine.guard.probe import ModelFingerprint, Probe, ProbeConfig, save_probe
    from oc_engine.training.probe_calibration import calibrate_probe
    from oc_engine.training.probe_training import auroc, exchange_scores, fit_probe

    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise OcEngineError(f"{out} exists and is not empty")
    started = time.perf_counter()
    layers, acts_train, acts_val = collect_split(loaded, specs, job, job.layers, progress=progress, log=log)
    weight, bias = fit_probe(acts_train, train_config, progress=progress)
    calibration = calibrate_probe(acts_val, weight, bias, target=job.target_benign_pause_rate)
    scores = exchange_scores(acts_val, weight, bias, calibration.alpha)
    unsafe = acts_val.labels.numpy() == UNSAFE
    metrics = {"validation_auroc": round(auroc(scores, unsafe), 4),
               "validation_f1_at_pause": round(_f1(scores >= calibration.pause, unsafe), 4),
               "train_auroc": round(auroc(exchange_scores(acts_train, weight, bias, calibration.alpha),
                                          acts_train.labels.numpy() == UNSAFE), 4),
               "calibration": calibration.as_dict(), "mode": job.mode, "layers": list(layers),
               "train_exchanges": len(acts_train.labels), "validation_exchanges": len(acts_val.labels),
               "data": [p + (f"@{s}" if s else "") for p, s in specs],
               "split": {"max_exchanges": job.max_exchanges, "validation": job.validation, "seed": job.seed,
                         "max_response_tokens": job.max_response_tokens,
                         "context_share": renderable_share(loaded.tokenizer, job.context_share)}, "objective": "ema" if job.mode == "tokens"
               else "logistic", "dtype": str(loaded.dtype).removeprefix("torch."),
               "seconds": round(time.perf_counter() - started, 1)}
    fingerprint = ModelFingerprint.of(loaded.model)
    config = ProbeConfig(model=fingerprint, layers=layers, hidden_size=fingerprint.hidden_size,
                         alpha=calibration.alpha, warn=calibration.warn, pause=calibration.pause, every=1,
                         chat_template=True, metrics=metrics)
    if out is not None:
        save_probe(Probe(config=config, weight=weight, bias=bias), out)
        metrics["out"] = str(out)
    return metrics


def _f1(predicted: np.ndarray, positives: np.ndarray) -> float:
    tp = float((predicted & positives).sum())
    return 2 * tp / max(float(predicted.sum() + positives.sum()), 1.0)


def sweep_layers(loaded, specs, job: ProbeJob, train_config, *, layers: list[int] | None = None,
                 plot: str | None = None, progress: bool = True, log=lambda m: None) -> dict:
    """Per-layer validation AUROC, F1 and streaming detection from one collection, plus the best pair."""
    from oc_engine.training.probe_calibration import calibrate_probe
    from oc_engine.training.probe_training import auroc, exchange_scores, fit_probe

    num_layers = loaded.model.config.get_text_config().num_hidden_layers
    candidates, acts_train, acts_val = collect_split(loaded, specs, job, layers or range(1, num_layers + 1),
                                                     progress=progress, log=log)
    unsafe = acts_val.labels.numpy() == UNSAFE

    def score(layer_set: tuple[int, ...]) -> dict:
        index = [candidates.index(layer) for layer in layer_set]
        sub_train = _layers(acts_train, index, layer_set)
        sub_val = _layers(acts_val, index, layer_set)
        weight, bias = fit_probe(sub_train, train_config)
        calibration = calibrate_probe(sub_val, weight, bias, target=job.target_benign_pause_rate)
        scores = exchange_scores(sub_val, weight, bias, calibration.alpha)
        return {"layers": list(layer_set), "auroc": round(auroc(scores, unsafe), 4),
                "f1_at_pause": round(_f1(scores >= calibration.pause, unsafe), 4),
                "detection_rate": round(calibration.detection_rate, 4),
                "benign_pause_rate": round(calibration.benign_pause_rate, 4),
                "median_tokens_to_detection": calibration.median_tokens_to_detection}

    from tqdm.auto import tqdm

    rows_out = [score((layer,)) for layer in tqdm(candidates, desc="sweep-layers", disable=not progress)]
    ranked = sorted(rows_out, key=lambda r: (-r["auroc"], -r["detection_rate"]))
    best_pair = tuple(sorted(r["layers"][0] for r in ranked[:2]))
    multi = score(best_pair) if len(candidates) > 1 else None
    report = {"per_layer": rows_out, "best_layer": ranked[0], "best_multi_layer": multi,
              "train_exchanges": len(acts_train.labels), "validation_exchanges": len(acts_val.labels),
              "mode": job.mode}
    if plot:
        _plot_sweep(rows_out, multi, plot)
        report["plot"] = plot
    return report


def _layers(acts, index: list[int], layer_set):
    from oc_engine.training.activations import Activations

    return Activations(acts.features[:, :, index], acts.mask, acts.labels, acts.prompts, tuple(layer_set))


def _plot_sweep(rows: list[dict], multi: dict | None, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = [r["layers"][0] for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(layers, [r["auroc"] for r in rows], marker="o", label="validation AUROC")
    ax.plot(layers, [r["detection_rate"] for r in rows], marker="s", label="streaming detection at target")
    if multi:
        ax.axhline(multi["auroc"], linestyle="--", color="gray", label=f"layers {multi['layers']} AUROC")
    ax.set_xlabel("hidden-state index (0 = embeddings)")
    ax.set_ylim(0, 1.02)
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    from oc_engine.plots import save_figure

    save_figure(fig, path)


def sweep_markdown(report: dict) -> str:
    lines = ["| layers | AUROC | F1 at pause | detection | benign pauses | median tokens to detection |",
             "|---|---:|---:|---:|---:|---:|"]
    rows = report["per_layer"] + ([report["best_multi_layer"]] if report["best_multi_layer"] else [])
    for r in rows:
        med = "" if r["median_tokens_to_detection"] is None else f"{r['median_tokens_to_detection']:.0f}"
        lines.append(f"| {','.join(map(str, r['layers']))} | {r['auroc']:.3f} | {r['f1_at_pause']:.3f} | "
                     f"{r['detection_rate']:.1%} | {r['benign_pause_rate']:.1%} | {med} |")
    return "\n".join(lines)
