"""`train-reader`: a state reader trained on the same exchanges and split as the probe.

The reader reads the probe's tapped layers (`pooled_states`), so collection reuses the probe's
cached activations when the data, split and layers are the same (the default build's are). It
is trained on whole answers and on random prefixes of them, since a check judges the answer up
to its pause point, and its block threshold is calibrated on the validation split so that at
most `target_safe_block_rate` of safe answers (judged whole) are blocked.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from oc_engine.data import LABELS, UNSAFE
from oc_engine.errors import OcEngineError
from oc_engine.guard.pooled_states import RECENT, pool_batch
from oc_engine.training.contexts import renderable_share


@dataclass(frozen=True)
class ReaderTrainConfig:
    hidden: int = 256  # MLP width
    epochs: int = 30
    prefixes: int = 3  # random prefixes of each answer trained on, beside the whole answer
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    dropout: float = 0.2
    target_safe_block_rate: float = 0.01
    seed: int = 0

    def __post_init__(self):
        if self.hidden < 1 or self.epochs < 1 or self.prefixes < 0:
            raise OcEngineError("reader training: hidden and epochs must be >= 1, prefixes >= 0")
        if not 0 < self.target_safe_block_rate < 1:
            raise OcEngineError(f"target safe block rate must be in (0, 1), got {self.target_safe_block_rate}")


def lengths_of(acts) -> torch.Tensor:
    """[E] rows each exchange has (the prompt's row plus its answer's)."""
    return acts.mask.sum(1).clamp(min=1)


def fit_reader(acts, config: ReaderTrainConfig, *, progress: bool = False) -> dict[str, np.ndarray]:
    """The reader's tensors (see `state_reader`) fitted on `acts` [E, T, L, H]."""
    from tqdm.auto import tqdm

    generator = torch.Generator().manual_seed(config.seed)
    lengths = lengths_of(acts)
    inputs = [pool_batch(acts.features, lengths)]
    for _ in range(config.prefixes):  # a check reads the answer up to its pause point
        cut = (torch.rand(len(lengths), generator=generator) * lengths).long() + 1
        inputs.append(pool_batch(acts.features, torch.minimum(cut, lengths)))
    x = torch.cat(inputs)
    y = acts.labels.repeat(len(inputs))
    mean, scale = x.mean(0), x.std(0) + 1e-3
    x = (x - mean) / scale
    torch.manual_seed(config.seed)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], config.hidden), torch.nn.GELU(approximate="tanh"),
                              torch.nn.Dropout(config.dropout), torch.nn.Linear(config.hidden, len(LABELS)))
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    net.train()
    for _ in tqdm(range(config.epochs), desc="train reader", unit="epoch", disable=not progress):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 256):
            batch = order[start:start + 256]
            loss = torch.nn.functional.cross_entropy(net(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    net.eval()
    first, last = net[0], net[3]
    return {"mean": mean.numpy(), "scale": scale.numpy(), "w1": first.weight.detach().numpy(),
            "b1": first.bias.detach().numpy(), "w2": last.weight.detach().numpy(), "b2": last.bias.detach().numpy()}


def reader_scores(reader, acts, lengths: torch.Tensor | None = None) -> np.ndarray:
    """[E] p_unsafe of each exchange's first `lengths` rows (default: all of them)."""
    features = pool_batch(acts.features, lengths_of(acts) if lengths is None else lengths, reader.config.recent)
    return np.concatenate([reader.probabilities(features[i:i + 512].numpy())[:, reader.config.unsafe_label]
                           for i in range(0, len(features), 512)]) if len(features) else np.zeros(0)


def calibrate(scores: np.ndarray, labels: np.ndarray, target: float) -> dict:
    """The lowest block threshold that blocks at most `target` of the safe answers, and what it catches."""
    safe, unsafe = scores[labels != UNSAFE], scores[labels == UNSAFE]
    if not len(safe) or not len(unsafe):
        raise OcEngineError("calibration needs safe and unsafe validation exchanges")
    ordered = np.sort(safe)[::-1]
    allowed = int(np.floor(target * len(safe)))  # safe answers that may score at or above it
    threshold = float(np.nextafter(ordered[allowed], np.float32(1))) if allowed < len(ordered) else 0.0
    threshold = min(max(threshold, 1e-6), 1.0)
    blocked = {name: round(float((scores[labels == i] >= threshold).mean()), 4) for i, name in enumerate(LABELS)
               if (labels == i).any()}
    return {"block_threshold": round(threshold, 6), "target_safe_block_rate": target,
            "safe_block_rate": round(float((safe >= threshold).mean()), 4),
            "unsafe_recall": round(float((unsafe >= threshold).mean()), 4), "block_rate": blocked,
            "samples": int(len(scores))}


def train_reader(loaded, probe, specs, out: str | Path | None, job, config: ReaderTrainConfig, *,
                 log=lambda m: None, progress: bool = True) -> dict:
    """Collect (the probe's layers, the probe job's data and split), fit, calibrate; writes the
    reader directory to `out` (if given)."""
    from oc_engine.guard.probe import ModelFingerprint
    from oc_engine.guard.state_reader import ReaderConfig, StateReader, save_reader
    from oc_engine.training.probe_pipeline import collect_split
    from oc_engine.training.probe_training import auroc

    if out is not None and Path(out).exists() and any(Path(out).iterdir()):
        raise OcEngineError(f"{out} exists and is not empty")
    started = time.perf_counter()
    probe.check_model(loaded.model)
    layers, acts_train, acts_val = collect_split(loaded, specs, job, probe.config.layers, progress=progress, log=log)
    log(f"training the reader on {len(acts_train.labels)} exchanges (and {config.prefixes} prefixes of each)")
    tensors = fit_reader(acts_train, config, progress=progress)
    fingerprint = ModelFingerprint.of(loaded.model)
    draft = ReaderConfig(model=fingerprint, layers=tuple(layers), hidden_size=fingerprint.hidden_size,
                         labels=LABELS, unsafe_label=UNSAFE, allow_threshold=0.5, block_threshold=0.5, recent=RECENT)
    scores = reader_scores(StateReader(Path("."), draft, tensors), acts_val)
    labels = acts_val.labels.numpy()
    calibration = calibrate(scores, labels, config.target_safe_block_rate)
    metrics = {"validation_auroc": round(auroc(scores, labels == UNSAFE), 4), "calibration": calibration,
               "train_exchanges": len(acts_train.labels), "validation_exchanges": len(labels),
               "data": [p + (f"@{s}" if s else "") for p, s in specs],
               "split": {"max_exchanges": job.max_exchanges, "validation": job.validation, "seed": job.seed,
                         "max_response_tokens": job.max_response_tokens,
                         "context_share": renderable_share(loaded.tokenizer, job.context_share)},
               "training": dataclasses.asdict(config), "dtype": str(loaded.dtype).removeprefix("torch."),
               "seconds": round(time.perf_counter() - started, 1)}
    threshold = calibration["block_threshold"]
    final = dataclasses.replace(draft, allow_threshold=threshold, block_threshold=threshold, metrics=metrics)
    if out is not None:
        save_reader(final, tensors, out)
        metrics["out"] = str(out)
    return metrics


def build_default_reader(job, config: ReaderTrainConfig, *, force: bool, log, progress: bool) -> dict:
    """The shipped reader for the embedded model: the default probe's data, split and layers."""
    from oc_engine.guard.probe import load_probe
    from oc_engine.models.embedded import default_probe_dir, default_reader_dir
    from oc_engine.models.loading import load_model
    from oc_engine.training.classifier_pipeline import default_data_specs
    from oc_engine.training.onpolicy_default import embedded_onpolicy_specs
    from oc_engine.training.probe_default import MAX_EXCHANGES, replace_shipped

    target = default_reader_dir()
    if target.exists() and not force:
        raise OcEngineError(f"{target} already exists (--force rebuilds the shipped reader)")
    shared = default_data_specs()  # before loading the model: fails at once without the shared data
    probe = load_probe(default_probe_dir())
    loaded = load_model(None, progress=False, dtype=probe.config.metrics.get("dtype"))
    specs = shared + embedded_onpolicy_specs(log, progress, loaded)
    recorded = probe.config.metrics.get("split", {})  # the probe's own split: its activations are cached
    job = dataclasses.replace(job, max_exchanges=job.max_exchanges or recorded.get("max_exchanges", MAX_EXCHANGES),
                              context_share=recorded.get("context_share", job.context_share))
    return replace_shipped(target, lambda out: train_reader(loaded, probe, specs, out, job, config, log=log,
                                                            progress=progress))
