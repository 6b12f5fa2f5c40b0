"""The defaults that make guarded generation work out of the box, in one place for every command.

- the probe shipped in the package, used with the embedded model when no --probe is given;
- the second stage when no --classifier is given: with the embedded model, the state reader
  shipped for it (it reads that model's own hidden states); with any other model, the
  model-agnostic classifier shipped as a delta over the embedded MiniLM, merged and exported
  into the user cache on first use. `--classifier embedded:encoder` and `embedded:reader` name
  the shipped ones.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from oc_engine.errors import OcEngineError
from oc_engine.models import embedded

Log = Callable[[str], None]


def resolve_probe_dir(probe_dir: str | Path | None, model_is_embedded: bool, log: Log = lambda m: None):
    """`probe_dir`, else the shipped probe when the model is the embedded one, else None."""
    if probe_dir is not None:
        return Path(probe_dir)
    default = embedded.default_probe_dir()
    if model_is_embedded and (default / "probe_config.json").is_file():
        log(f"guarding with the default probe for the embedded model ({default})")
        return default
    return None


def require_probe(loaded, probe_dir: str | Path | None, model_is_embedded: bool, log: Log = lambda m: None):
    """(directory, Probe) for `resolve_probe_dir(...)`, checked against the loaded model; an error
    when there is none (commands that measure the guard need one)."""
    from oc_engine.guard.probe import load_probe

    directory = resolve_probe_dir(probe_dir, model_is_embedded, log)
    if directory is None:
        raise OcEngineError("no probe: give --probe DIR (a default probe ships only for the embedded model)")
    probe = load_probe(directory)
    probe.check_model(loaded.model)
    return directory, probe


EMBEDDED_ENCODER, EMBEDDED_READER = "embedded:encoder", "embedded:reader"  # --classifier names


def default_reader() -> Path | None:
    """The shipped state reader for the embedded model (tests replace this to run without it)."""
    directory = embedded.default_reader_dir()
    return directory if (directory / "reader_config.json").is_file() else None


def default_classifier_delta() -> Path | None:
    """The shipped default classifier's delta directory (tests replace this to run without it)."""
    return embedded.default_classifier_delta_dir()


def resolve_classifier_dir(classifier_dir: str | Path | None, *, required: bool = False,
                           log: Log = lambda m: None) -> Path | None:
    """An export directory: `classifier_dir` (a delta directory is built into the cache on first
    use), else the shipped default. None only when the default is switched off (tests) and not
    `required`; a missing or corrupt shipped delta is an error, never a silent lack of a stage."""
    from oc_engine.guard.classifier_delta import is_delta_dir, materialize

    if classifier_dir == EMBEDDED_READER:
        return _shipped_reader()
    if classifier_dir == EMBEDDED_ENCODER:
        classifier_dir = default_classifier_delta() or embedded.default_classifier_delta_dir()
    if classifier_dir is not None:
        path = Path(classifier_dir)
        return materialize(path, log) if is_delta_dir(path) else path
    delta = default_classifier_delta()
    if delta is None:
        if required:
            raise OcEngineError("no --classifier given and the default classifier is switched off")
        return None
    export = materialize(delta, log)
    log(f"using the default classifier ({delta})")
    return export


def resolve_classifier(classifier_dir: str | Path | None, device: str, *, required: bool = False,
                       log: Log = lambda m: None, model_is_embedded: bool = False, quantized: bool = False):
    """The second stage: a StateReader for a reader directory (or, with the unquantized embedded
    model and no `classifier_dir`, the shipped one), else an ExchangeClassifier for
    `resolve_classifier_dir(...)`, or None."""
    from oc_engine.guard.classifier import ExchangeClassifier
    from oc_engine.guard.state_reader import is_reader_dir, load_reader

    if classifier_dir is None and model_is_embedded and default_reader() is not None:
        if quantized:
            log("the shipped state reader was trained on the unquantized embedded model: using the shipped "
                "encoder instead (train a reader for the quantized model with `oc-engine train-reader --quantize`)")
        else:
            log(f"using the default state reader for the embedded model ({default_reader()})")
            return load_reader(default_reader())
    directory = resolve_classifier_dir(classifier_dir, required=required, log=log)
    if directory is not None and is_reader_dir(directory):
        return load_reader(directory)
    return None if directory is None else ExchangeClassifier(directory, device=device)


def _shipped_reader() -> Path:
    reader = default_reader()
    if reader is None:
        raise OcEngineError(f"no state reader is shipped in this package ({embedded.default_reader_dir()})")
    return reader
