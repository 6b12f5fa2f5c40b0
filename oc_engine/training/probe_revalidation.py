"""Re-validate a probe on a quantized model: its held-out exchanges replayed through both models.

Quantization moves the hidden states a probe reads. A probe made on the unquantized model is
accepted on a quantized one only if its validation AUROC there (the same exchanges, the same
probe, the same EMA) is within `tolerance` of its AUROC on the model it was made on. The
record (also the pause rates at the probe's own thresholds, which AUROC does not see) is kept
in the probe's metrics, where `Probe.check_model` reads it.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from oc_engine.data import UNSAFE
from oc_engine.errors import OcEngineError
from oc_engine.guard.probe import REVALIDATION_KEY, Probe

DEFAULT_TOLERANCE = 0.02  # AUROC points a quantized model may lose


def revalidate(probe: Probe, reference, quantized, specs, job, *, tolerance: float = DEFAULT_TOLERANCE,
               log=lambda m: None, progress: bool = True) -> dict:
    """reference, quantized: LoadedModels (the probe's own model, and the one to accept it on).
    specs, job: the data and split the probe was trained with (its held-out part is replayed)."""
    from oc_engine.training.activations import CollectSpec, collect
    from oc_engine.training.contexts import renderable_share
    from oc_engine.training.probe_pipeline import read_specs, split_exchanges

    started = time.perf_counter()
    probe.check_model(reference.model)
    _, held = split_exchanges(read_specs(specs, job.max_exchanges, job.seed), job.validation, job.seed,
                              renderable_share(reference.tokenizer, job.context_share))
    expected = probe.config.metrics.get("validation_exchanges")
    if expected is not None and expected != len(held):
        log(f"warning: {len(held)} held-out exchanges, the probe's training held {expected} out: "
            f"check --data, --max-exchanges, --validation and --seed against its training")
    spec = CollectSpec(layers=tuple(probe.config.layers), mode=job.mode, max_response_tokens=job.max_response_tokens)
    log(f"{len(held)} held-out exchanges through the reference and the {quantized.quantization} model")
    rows = {}
    for name, loaded in (("reference", reference), ("quantized", quantized)):
        acts = collect(loaded.model, loaded.tokenizer, held, spec, batch_size=job.batch_size, progress=progress)
        rows[name] = _operating_point(probe, acts)
    ref, got = rows["reference"], rows["quantized"]
    passed = got["auroc"] >= ref["auroc"] - tolerance
    from oc_engine.models.quantize import QUANTIZER_VERSION

    return {"quantization": quantized.quantization or "none", "quantizer_version": QUANTIZER_VERSION,
            "validation_auroc": got["auroc"],
            "reference_auroc": ref["auroc"], "tolerance": tolerance, "passed": bool(passed),
            "at_pause": {"pause": probe.config.pause, "reference": ref["at_pause"], "quantized": got["at_pause"]},
            "exchanges": len(held), "data": [p + (f"@{s}" if s else "") for p, s in specs],
            "dtype": str(quantized.dtype).removeprefix("torch."),
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(time.perf_counter() - started, 1)}


def with_record(probe: Probe, record: dict) -> Probe:
    """The probe with `record` kept under its quantization (replacing an older one)."""
    from dataclasses import replace

    metrics = dict(probe.config.metrics)
    records = dict(metrics.get(REVALIDATION_KEY, {}))
    records[record["quantization"]] = record
    metrics[REVALIDATION_KEY] = records
    return replace(probe, config=replace(probe.config, metrics=metrics))


def _operating_point(probe: Probe, acts) -> dict:
    from oc_engine.training.probe_training import auroc, exchange_scores

    scores = exchange_scores(acts, probe.weight, probe.bias, probe.config.alpha)
    labels = acts.labels.numpy()
    unsafe, safe_compliance = labels == UNSAFE, labels == 0
    if not unsafe.any() or not safe_compliance.any():
        raise OcEngineError("the held-out exchanges need both unsafe_compliance and safe_compliance answers")
    paused = scores >= probe.config.pause
    return {"auroc": round(auroc(scores, unsafe), 4),
            "at_pause": {"detection_rate": round(float(paused[unsafe].mean()), 4),
                         "benign_pause_rate": round(float(paused[safe_compliance].mean()), 4)}}
