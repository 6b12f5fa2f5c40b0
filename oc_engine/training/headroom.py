"""`oc-engine headroom`: how far can more training data of this kind take the guard?

When the guard misses a target on an evaluation file, two causes look alike: the training data
is unlike that file (more data fixes it), or the target model's hidden states and the
classifier's backbone cannot tell its two sides apart (only a stronger model fixes it). This
tells them apart with a cross-validated upper bound: the file's own labelled exchanges are cut
into folds grouped by prompt; for each fold a probe is trained (same layers, alpha and
objective as the given probe, starting from its weights) and the classifier is fine-tuned (from
its checkpoint) on the other folds, then scored on it: both stages keep what they learnt and
adapt to the file. Reported per stage (`STAGES`), as shipped and trained in-distribution: AUROC
(unsafe_compliance vs the rest, one score per exchange: the probe's highest EMA, the
classifier's p(unsafe) on the same response tokens) and the share of unsafe answers caught at a
benign (safe_compliance) rate. Two more stages: both combined (sum of standardised logits), and
the probe read at the prompt's last position alone (where the request's intent is formed,
before the answer's own words, which benign twins share, can blur it). The in-distribution
figures are optimistic (a few hundred exchanges, topics shared across folds): when even they
fall short of a target, more data of that kind will not reach it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from oc_engine.data import UNSAFE, Exchange
from oc_engine.errors import OcEngineError
from oc_engine.training.probe_training import auroc
from oc_engine.training.splits import prompt_hash


STAGES = {"probe": "probe (highest EMA over the response)",
          "probe_first": "probe on the prompt's last position only (the state that makes the first token)",
          "classifier": "classifier p(unsafe)", "both": "probe + classifier (sum of standardised logits)"}


@dataclass(frozen=True)
class HeadroomConfig:
    folds: int = 5
    max_response_tokens: int = 64
    benign_rate: float = 0.05  # the safe_compliance share a stage may flag
    probe_steps: int = 300
    classifier_epochs: float = 3.0
    classifier_learning_rate: float = 3e-5
    classifier_batch_size: int = 16
    classifier_max_length: int = 512  # positions of a check's window, as the default classifier reads
    batch_size: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.folds < 2:
            raise OcEngineError(f"folds must be >= 2, got {self.folds}")
        if not 0 < self.benign_rate < 1:
            raise OcEngineError(f"benign rate must be in (0, 1), got {self.benign_rate}")
        if self.max_response_tokens < 1 or self.probe_steps < 1 or self.classifier_epochs <= 0:
            raise OcEngineError("max response tokens, probe steps and classifier epochs must be positive")


def assign_folds(exchanges: list[Exchange], folds: int, seed: int = 0) -> np.ndarray:
    """Fold index per exchange [E]; every exchange of one prompt in the same fold."""
    return np.array([prompt_hash(e.prompt, seed) % folds for e in exchanges], dtype=np.int64)


def caught_at_benign_rate(scores: np.ndarray, labels: np.ndarray, rate: float) -> float:
    """Share of unsafe_compliance exchanges flagged by the lowest threshold that flags at most
    `rate` of the safe_compliance ones (a score flags when it is >= the threshold)."""
    scores, labels = np.asarray(scores, dtype=np.float64), np.asarray(labels)
    benign, unsafe = np.sort(scores[labels == 0])[::-1], scores[labels == UNSAFE]
    allowed = int(np.floor(rate * len(benign)))  # benign exchanges that may sit at or above the threshold
    if allowed >= len(benign):
        return 1.0
    threshold = np.nextafter(benign[allowed], np.inf)  # just above the first benign score we must not flag
    return float((unsafe >= threshold).mean())


def require_both_classes(exchanges: list[Exchange]) -> np.ndarray:
    """The labels [E]; an error unless both unsafe_compliance and safe_compliance are there."""
    labels = np.array([e.label for e in exchanges])
    if not _both_classes(labels):
        raise OcEngineError("headroom needs unsafe_compliance and safe_compliance exchanges")
    return labels


def check_folds(exchanges: list[Exchange], config: "HeadroomConfig") -> tuple[np.ndarray, np.ndarray]:
    """(labels, fold of each exchange); an error unless every fold's complement has both classes."""
    labels = require_both_classes(exchanges)
    prompts = len({e.prompt for e in exchanges})
    if prompts < config.folds:
        raise OcEngineError(f"{config.folds} folds need at least {config.folds} distinct prompts; "
                            f"the data has {prompts}")
    folds = assign_folds(exchanges, config.folds, config.seed)
    for fold in np.unique(folds):
        if not _both_classes(labels[folds != fold]):
            raise OcEngineError(f"too few exchanges for {config.folds} folds: without fold {fold + 1} no "
                                "unsafe_compliance or no safe_compliance exchange is left to train on "
                                "(fewer --folds or more data)")
    return labels, folds


def headroom(loaded, probe, exchanges: list[Exchange], config: HeadroomConfig, *, classifier=None,
             checkpoint: str | Path | None = None, progress: bool = True, log=lambda m: None) -> dict:
    """The report: per stage (`STAGES`; the classifier's only with `classifier` / `checkpoint`),
    shipped and cross-validated. exchanges: labelled, both unsafe_compliance and safe_compliance."""
    labels, folds = check_folds(exchanges, config)
    log(f"{len(exchanges)} exchanges ({int((labels == UNSAFE).sum())} unsafe_compliance, "
        f"{int((labels == 0).sum())} safe_compliance), {config.folds} folds grouped by prompt")
    acts = _activations(loaded, probe, exchanges, config, progress)
    first = _first_position(acts)
    shipped = {"probe": _probe_scores(probe, acts), "probe_first": _probe_scores(probe, first)}
    trained = {"probe": _cross_validated_probe(probe, acts, folds, config),
               "probe_first": _cross_validated_probe(probe, first, folds, config)}
    responses = _responses_as_scored(loaded.tokenizer, exchanges, config)
    if classifier is not None:
        shipped["classifier"] = _shipped_classifier(classifier, exchanges, responses)
    if checkpoint is not None:
        log(f"fine-tuning {checkpoint} on each fold's complement")
        trained["classifier"] = _cross_validated_classifier(checkpoint, exchanges, responses, folds, config, progress)
    for scores in (shipped, trained):
        if "classifier" in scores:
            scores["both"] = _standardised_logit(scores["probe"]) + _standardised_logit(scores["classifier"])

    def measure(scores: np.ndarray) -> dict:
        return {"auroc": round(auroc(scores, labels == UNSAFE), 4),
                "caught": round(caught_at_benign_rate(scores, labels, config.benign_rate), 4)}

    return {"exchanges": len(exchanges), "unsafe": int((labels == UNSAFE).sum()), "benign": int((labels == 0).sum()),
            "folds": config.folds, "benign_rate": config.benign_rate,
            "max_response_tokens": config.max_response_tokens,
            "shipped": {stage: measure(s) for stage, s in shipped.items()},
            "cross_validated": {stage: measure(s) for stage, s in trained.items()}}


def run_headroom(*, model, probe_dir, classifier_dir, checkpoint, no_classifier, specs, limit, config: HeadroomConfig,
                 progress: bool, log) -> dict:
    """Load the model, probe and classifier (the defaults unless given), then `headroom`.

    The classifier is fine-tuned from `checkpoint`; else from the checkpoint the classifier was
    exported from (its `source_model`: for a delta, the merged model kept beside the export)."""
    from oc_engine.models.defaults import require_probe, resolve_classifier
    from oc_engine.models.loading import load_model
    from oc_engine.training.probe_pipeline import read_specs

    exchanges = read_specs(specs, limit, config.seed)  # before loading anything: bad files fail at once
    check_folds(exchanges, config)
    if checkpoint is not None and not no_classifier:
        check_checkpoint(checkpoint)
    loaded = load_model(model, progress=False)
    directory, probe = require_probe(loaded, probe_dir, model is None, log)
    classifier = None if no_classifier else resolve_classifier(classifier_dir, "cpu", log=log)
    if checkpoint is None and classifier is not None:
        source = classifier.config.source_model
        checkpoint = source if source and (Path(source) / "config.json").is_file() else None
    if no_classifier or (classifier is None and checkpoint is None):
        log("no classifier: measuring the probe alone")
    elif checkpoint is None:
        log("no classifier checkpoint to fine-tune (--classifier-checkpoint): the classifier is measured as shipped only")
    try:
        report = headroom(loaded, probe, exchanges, config, classifier=classifier,
                          checkpoint=None if no_classifier else checkpoint, progress=progress, log=log)
    finally:
        if classifier is not None:
            classifier.close()
    return {"model": loaded.source, "probe": str(directory), "classifier": str(classifier.path) if classifier else None,
            "checkpoint": None if no_classifier or checkpoint is None else str(checkpoint), **report}


def check_checkpoint(checkpoint: str | Path) -> None:
    """A one-line error unless `checkpoint` is a three-class sequence classifier (what headroom fine-tunes)."""
    from transformers import AutoConfig

    from oc_engine.data import LABELS

    try:
        labels = AutoConfig.from_pretrained(checkpoint).num_labels
    except (OSError, ValueError) as exc:
        raise OcEngineError(f"cannot read the classifier checkpoint {checkpoint}: {str(exc).splitlines()[0]}") from exc
    if labels != len(LABELS):
        raise OcEngineError(f"{checkpoint} has {labels} labels; headroom fine-tunes a three-class checkpoint "
                            f"({', '.join(LABELS)})")


def headroom_markdown(report: dict) -> str:
    rate = f"{report['benign_rate']:.0%}"
    lines = [f"{report['exchanges']} exchanges ({report['unsafe']} unsafe_compliance, {report['benign']} "
             f"safe_compliance), {report['folds']} folds grouped by prompt, {report['max_response_tokens']} "
             "response tokens", "",
             f"| stage | shipped AUROC | shipped: unsafe caught at {rate} benign | trained on the other folds: AUROC "
             f"| unsafe caught at {rate} benign |", "|---|---:|---:|---:|---:|"]
    for stage in STAGES:
        shipped, trained = report["shipped"].get(stage), report["cross_validated"].get(stage)
        if shipped is None and trained is None:
            continue
        cells = [f"{v['auroc']:.3f} | {v['caught']:.1%}" if v else "- | -" for v in (shipped, trained)]
        lines.append(f"| {STAGES[stage]} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


# -- internals ----------------------------------------------------------------------------
def _both_classes(labels: np.ndarray) -> bool:
    return bool((labels == UNSAFE).any() and (labels == 0).any())


def _activations(loaded, probe, exchanges, config, progress):
    from oc_engine.training.activations import CollectSpec, collect

    points = loaded.model.config.get_text_config().num_hidden_layers + 1
    layers = tuple(layer % points for layer in probe.config.layers)  # the weight's row order
    spec = CollectSpec(layers=layers, mode="tokens", max_response_tokens=config.max_response_tokens)
    return collect(loaded.model, loaded.tokenizer, exchanges, spec, batch_size=config.batch_size, progress=progress)


def _first_position(acts):
    """Only the state that produces the first response token: the prompt's last position.
    (A probe on one position trains as plain logistic regression.)"""
    from oc_engine.training.activations import Activations

    return Activations(acts.features[:, :1], acts.mask[:, :1], acts.labels, acts.prompts, acts.layers)


def _probe_scores(probe, acts) -> np.ndarray:
    from oc_engine.training.probe_training import exchange_scores

    return exchange_scores(acts, probe.weight, probe.bias, probe.config.alpha)


def _cross_validated_probe(probe, acts, folds, config) -> np.ndarray:
    from oc_engine.training.probe_training import ProbeTrainConfig, exchange_scores, fit_probe

    train_config = ProbeTrainConfig(alpha=probe.config.alpha, steps=config.probe_steps, seed=config.seed)
    scores = np.zeros(len(folds))
    for fold in np.unique(folds):
        held = np.flatnonzero(folds == fold)
        weight, bias = fit_probe(acts.subset(np.flatnonzero(folds != fold).tolist()), train_config,
                                 init=(probe.weight, probe.bias))
        scores[held] = exchange_scores(acts.subset(held.tolist()), weight, bias, probe.config.alpha)
    return scores


def _responses_as_scored(tokenizer, exchanges, config) -> list[str]:
    """Each response cut to the tokens the probe scored, so both stages judge the same text."""
    from oc_engine.training.activations import CollectSpec, exchange_ids

    spec = CollectSpec(layers=(0,), max_response_tokens=config.max_response_tokens)
    out = []
    for e in exchanges:
        ids, prompt_len = exchange_ids(tokenizer, e, spec)
        out.append(tokenizer.decode(ids[prompt_len:], skip_special_tokens=True))
    return out


def _shipped_classifier(classifier, exchanges, responses, batch_size: int = 32) -> np.ndarray:
    prompts = [e.prompt for e in exchanges]
    return np.concatenate([classifier.probabilities(prompts[i:i + batch_size], responses[i:i + batch_size])
                           [:, classifier.config.unsafe_label] for i in range(0, len(prompts), batch_size)])


def _cross_validated_classifier(checkpoint, exchanges, responses, folds, config, progress) -> np.ndarray:
    from transformers import AutoTokenizer

    from oc_engine.guard.classifier import load_sequence_classifier
    from oc_engine.training.classifier import ClassifierTrainConfig, class_weights, fit_classifier, predict

    rows = [Exchange(e.prompt, r, e.label, e.source) for e, r in zip(exchanges, responses)]
    train_config = ClassifierTrainConfig(epochs=config.classifier_epochs, batch_size=config.classifier_batch_size,
                                         learning_rate=config.classifier_learning_rate,
                                         max_length=config.classifier_max_length, prefixes=0,
                                         bf16=False, seed=config.seed)
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    scores = np.zeros(len(rows))
    for fold in np.unique(folds):
        torch.manual_seed(config.seed)
        model = _quietly(load_sequence_classifier, checkpoint)  # one progress bar per fold is the training's
        train = [rows[i] for i in np.flatnonzero(folds != fold)]
        held = np.flatnonzero(folds == fold)
        fit_classifier(model, tokenizer, train, train_config, class_weights([e.label for e in train], 3), False,
                       progress, desc=f"classifier fold {fold + 1}/{config.folds}")
        scores[held] = predict(model, tokenizer, [rows[i] for i in held], config.classifier_max_length,
                               False)[:, UNSAFE]
    return scores


def _quietly(load, *args):
    """`load(*args)` without transformers' own "Loading weights" progress bar."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        return load(*args)
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _standardised_logit(p: np.ndarray) -> np.ndarray:
    """Probabilities (or any scores in (0, 1)) as z-scored logits, so two stages add on one scale."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    logit = np.log(p) - np.log1p(-p)
    return (logit - logit.mean()) / max(logit.std(), 1e-12)
