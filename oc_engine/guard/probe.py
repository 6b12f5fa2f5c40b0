"""The probe directory: a linear probe on tapped hidden states, and the settings the guard uses.

    probe.safetensors   weight [L, H] fp32 (one row per tapped layer), bias [1] fp32
    probe_config.json   format, model fingerprint, layers, hidden_size, alpha, warn, pause,
                        every, chat_template, metrics

Loading checks everything and fails with one line: a missing or corrupt file, a probe made
for another model (fingerprint), a wrong hidden size, thresholds out of range.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from oc_engine.errors import OcEngineError

PROBE_FORMAT = "oc-engine-probe/1"
WEIGHTS_FILE, CONFIG_FILE = "probe.safetensors", "probe_config.json"
REVALIDATION_KEY = "revalidated"  # metrics[...][quantization]: AUROC replayed through a quantized model


@dataclass(frozen=True)
class ModelFingerprint:
    architecture: str
    hidden_size: int
    num_layers: int
    weights_hash: str  # sha256 of the sign bits of 4096 embedding values: the same in fp32, bf16, fp16
    quantization: str | None = None  # "int8" | "int4": the linear layers the probe's activations came through

    @classmethod
    def of(cls, model: torch.nn.Module) -> "ModelFingerprint":
        from oc_engine.models.quantize import model_quantization

        return cls.from_parts(type(model).__name__, model.config.get_text_config(),
                              model.get_input_embeddings().weight, model_quantization(model))

    @classmethod
    def from_parts(cls, architecture: str, config, embedding: torch.Tensor,
                   quantization: str | None = None) -> "ModelFingerprint":
        """For engines that are not a Hugging Face module (vLLM): the architecture's HF name, its
        text config, and the whole input embedding [vocab, H] (unpadded, not a tensor-parallel shard)."""
        flat = embedding.detach().reshape(-1)
        # Integer spacing: float linspace rounds past the end on large embeddings.
        sample = flat[(torch.arange(4096, dtype=torch.long) * (flat.numel() - 1) // 4095).to(flat.device)]
        signs = torch.signbit(sample).to(torch.uint8).cpu().numpy().tobytes()
        return cls(architecture=architecture, hidden_size=int(config.hidden_size),
                   num_layers=int(config.num_hidden_layers), weights_hash=hashlib.sha256(signs).hexdigest()[:32],
                   quantization=quantization)

    def describe(self) -> str:
        quantized = f", {self.quantization}" if self.quantization else ""
        return (f"{self.architecture}, hidden {self.hidden_size}, {self.num_layers} layers, "
                f"weights {self.weights_hash[:8]}{quantized}")


@dataclass(frozen=True)
class ProbeConfig:
    """Guard settings carried with a probe; validated on construction."""

    model: ModelFingerprint
    layers: tuple[int, ...]  # indices into output_hidden_states (negative from the end)
    hidden_size: int
    alpha: float = 0.3  # EMA weight of the newest score
    warn: float = 0.5  # EMA at or above: logged, still streamed
    pause: float = 0.8  # EMA at or above: tokens are held and the classifier is asked
    every: int = 1  # check the flags every N tokens
    chat_template: bool = True
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.layers:
            raise OcEngineError("probe config: 'layers' is empty")
        if not 0 < self.alpha <= 1:
            raise OcEngineError(f"probe alpha must be in (0, 1], got {self.alpha}")
        for name in ("warn", "pause"):
            value = getattr(self, name)
            if not 0 <= value <= 1:
                raise OcEngineError(f"probe {name} threshold must be in [0, 1], got {value}")
        if self.warn > self.pause:
            raise OcEngineError(f"probe warn threshold ({self.warn}) is above the pause threshold ({self.pause})")
        if self.every < 1:
            raise OcEngineError(f"probe cadence 'every' must be >= 1, got {self.every}")

    def with_overrides(self, **overrides) -> "ProbeConfig":
        """A copy with the given settings replaced (None leaves one as it is), re-validated."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_json(self) -> dict:
        return {"format": PROBE_FORMAT, **asdict(self), "layers": list(self.layers)}


@dataclass(frozen=True)
class Probe:
    config: ProbeConfig
    weight: torch.Tensor  # [L, H] fp32
    bias: torch.Tensor  # [1] fp32
    source: Path | None = None  # the directory it was loaded from (the vLLM plugin loads the weights there)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise unless this probe was trained on `model`, or on the same model quantized otherwise
        and re-validated on this quantization (see `revalidation`)."""
        self.check_fingerprint(ModelFingerprint.of(model))

    def check_fingerprint(self, actual: ModelFingerprint) -> None:
        """`check_model` for a model known by its fingerprint."""
        expected = self.config.model
        if replace(actual, quantization=None) != replace(expected, quantization=None):
            raise OcEngineError(f"probe was trained for another model ({expected.describe()}); this model is "
                                f"{actual.describe()}")
        if actual.quantization is None and expected.quantization is not None:
            raise OcEngineError(f"probe was made on the {expected.quantization} model and this one is unquantized: "
                                f"run with --quantize {expected.quantization}, or use a probe made without it")
        if actual.quantization != expected.quantization:
            from oc_engine.models.quantize import QUANTIZER_VERSION

            record = self.revalidation(actual.quantization)
            current = record is not None and record.get("quantizer_version") == QUANTIZER_VERSION
            if not current or not record.get("passed"):
                if record is None:
                    found = "it was never re-validated there"
                elif not current:
                    found = "it was re-validated with another version of the quantizer"
                else:
                    found = (f"its AUROC there was {record['validation_auroc']} against {record['reference_auroc']} "
                             f"(tolerance {record['tolerance']})")
                raise OcEngineError(
                    f"probe was made on the {expected.quantization or 'unquantized'} model and this one is "
                    f"{actual.quantization}: {found}. Re-validate it with `oc-engine revalidate-probe --quantize "
                    f"{actual.quantization}` or train one with `oc-engine train-probe --quantize "
                    f"{actual.quantization}`")
        if actual.hidden_size != self.config.hidden_size:
            raise OcEngineError(f"probe expects hidden size {self.config.hidden_size}, "
                                f"the model has {actual.hidden_size}")

    def revalidation(self, quantization: str | None) -> dict | None:
        """The record `revalidate-probe` left for `quantization` (None: unquantized), if any."""
        return self.config.metrics.get(REVALIDATION_KEY, {}).get(quantization or "none")


def save_probe(probe: Probe, out_dir: str | Path) -> Path:
    """Write the probe directory atomically (a temporary directory renamed into place)."""
    from safetensors.torch import save_file

    def write(tmp: Path) -> None:
        save_file({"weight": probe.weight.float().contiguous(), "bias": probe.bias.float().reshape(1)},
                  str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(probe.config.to_json(), indent=2) + "\n")

    return write_directory(out_dir, write)


def write_directory(out_dir: str | Path, write) -> Path:
    """`write(tmp)` fills a temporary directory beside `out_dir` (a new or empty directory),
    which is then renamed into place, readable by all: a reader never sees half a directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise OcEngineError(f"{out_dir} exists and is not empty")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        write(tmp)
        for file in tmp.iterdir():
            file.chmod(0o644)
        tmp.chmod(0o755)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def rewrite_probe_config(path: str | Path, config: ProbeConfig) -> None:
    """Replace a probe directory's config atomically (its weights stay as they are)."""
    target = Path(path) / CONFIG_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{CONFIG_FILE}-", dir=path)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(config.to_json(), indent=2) + "\n")
        os.chmod(tmp, 0o644)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def probe_config_from_json(raw: dict, where: str) -> ProbeConfig:
    """A ProbeConfig from probe_config.json's object, every field type-checked (never coerced)."""
    from oc_engine.config_fields import Fields

    fields = Fields(raw, where)
    fingerprint = fingerprint_from_fields(fields.child("model"), where)
    hidden_size = fields.integer("hidden_size")
    if hidden_size < 1:
        raise OcEngineError(f"{where}: 'hidden_size' must be >= 1, got {hidden_size}")
    return ProbeConfig(model=fingerprint, layers=fields.integers("layers"), hidden_size=hidden_size,
                       alpha=fields.number("alpha"), warn=fields.number("warn"), pause=fields.number("pause"),
                       every=fields.integer("every"), chat_template=fields.boolean("chat_template", True),
                       metrics=fields.mapping("metrics", {}))


def fingerprint_from_fields(model, where: str) -> ModelFingerprint:
    """A ModelFingerprint from the `model` object of a probe's or a state reader's config."""
    quantization = model.string("quantization", None)
    if quantization is not None and quantization not in ("int8", "int4"):
        raise OcEngineError(f"{where}: model 'quantization' must be int8, int4 or null, got {quantization!r}")
    return ModelFingerprint(architecture=model.string("architecture"), hidden_size=model.integer("hidden_size"),
                            num_layers=model.integer("num_layers"), weights_hash=model.string("weights_hash"),
                            quantization=quantization)


def load_probe(path: str | Path) -> Probe:
    """Read and validate a probe directory (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_dir():
        raise OcEngineError(f"probe directory not found: {path}")
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise OcEngineError(f"probe directory {path} has no {name}")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OcEngineError(f"{path / CONFIG_FILE} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or raw.get("format") != PROBE_FORMAT:
        raise OcEngineError(f"{path / CONFIG_FILE}: not an oc-engine probe (format {PROBE_FORMAT!r} expected)")
    config = probe_config_from_json(raw, str(path / CONFIG_FILE))
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise OcEngineError(f"{path / WEIGHTS_FILE} is corrupt: {exc}") from exc
    weight, bias = tensors.get("weight"), tensors.get("bias")
    if weight is None or bias is None:
        raise OcEngineError(f"{path / WEIGHTS_FILE} must hold 'weight' and 'bias'")
    expected = (len(config.layers), config.hidden_size)
    if tuple(weight.shape) != expected or bias.numel() != 1:
        raise OcEngineError(f"{path / WEIGHTS_FILE}: weight shape {tuple(weight.shape)} does not match the config "
                            f"({expected[0]} layers x hidden size {expected[1]})")
    if not torch.isfinite(weight).all() or not torch.isfinite(bias).all():
        raise OcEngineError(f"{path / WEIGHTS_FILE} holds non-finite values")
    return Probe(config=config, weight=weight.float(), bias=bias.float().reshape(1), source=path)
