"""The default probe for the embedded model: one command, shipped in the package (kilobytes).

Recipe: the embedded SmolLM2-135M-Instruct's own labelled answers (`onpolicy_default`: a
sample of the shared prompt files, and benign prompts on harmful topics) join a sample of
the shared labelled exchanges; a per-token probe is trained on layers `DEFAULT_LAYERS`
(chosen by `sweep-layers`) and calibrated to pause at most 2% of safe answers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from oc_engine.errors import OcEngineError

DEFAULT_LAYERS = (17, 19)  # from sweep-layers (bench/results/cpu-sweep-layers.md): best AUROC and earliest detection
MAX_EXCHANGES = 1000  # per file: the whole build stays in minutes on a 2-core CPU


def build_default_probe(job, train_config, *, force: bool, log, progress: bool) -> dict:
    """job's layers and max_exchanges, when unset, become DEFAULT_LAYERS and MAX_EXCHANGES."""
    import dataclasses

    from oc_engine.models.embedded import default_probe_dir
    from oc_engine.models.loading import load_model
    from oc_engine.training.classifier_pipeline import default_data_specs
    from oc_engine.training.onpolicy_default import embedded_onpolicy_specs
    from oc_engine.training.probe_pipeline import train_probe

    target = default_probe_dir()
    if target.exists() and not force:
        raise OcEngineError(f"{target} already exists (--force rebuilds the shipped probe)")
    shared = default_data_specs()  # before loading the model: fails at once without the shared data
    loaded = load_model(None, progress=False)
    specs = shared + embedded_onpolicy_specs(log, progress, loaded)
    job = dataclasses.replace(job, layers=job.layers or DEFAULT_LAYERS,
                              max_exchanges=job.max_exchanges or MAX_EXCHANGES)
    return replace_shipped(target, lambda out: train_probe(loaded, specs, out, job, train_config, log=log,
                                                           progress=progress))


def replace_shipped(target: Path, build) -> dict:
    """`build(out)` writes a new directory and returns its report; it then replaces `target`
    (a shipped asset), which a failed build leaves as it was."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        report = build(staging / target.name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging / target.name, target)
        report["out"] = str(target)
        return report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
