"""A second stage that reads the served model's own hidden states instead of the text.

The exchange classifier is a second encoder reading the text pair. A state reader is a small
MLP over the states the engine already taps for the probe, pooled over the exchange
(`pooled_states`): the request as the served model understood it (the prompt's last position,
after any system prompt and history) and the answer so far. It judges intent and compliance as
the served model represents them, costs well under a millisecond per check on a CPU, and needs
no second model in memory. It is tied to the model it was trained on (fingerprint) and to the
probe's layers (the states the step taps).

    reader.safetensors    mean [D], scale [D] (feature standardisation), w1 [K, D], b1 [K],
                          w2 [C, K], b2 [C] (fp32; D = 3 * layers * hidden, GELU(tanh) between)
    reader_config.json    format, model fingerprint, layers, hidden_size, recent, labels,
                          unsafe_label, allow_threshold, block_threshold, metrics

A missing or corrupt file is one error naming it; a reader for another model, quantization or
layer set is refused with one line, as probes are.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from oc_engine.errors import OcEngineError
from oc_engine.guard.classifier import ClassifierConfig
from oc_engine.guard.pooled_states import RECENT, AnswerStates
from oc_engine.guard.probe import ModelFingerprint, write_directory

READER_FORMAT = "oc-engine-state-reader/1"
WEIGHTS_FILE, CONFIG_FILE = "reader.safetensors", "reader_config.json"
TENSORS = ("mean", "scale", "w1", "b1", "w2", "b2")


def is_reader_dir(path: str | Path) -> bool:
    return (Path(path) / CONFIG_FILE).is_file()


@dataclass(frozen=True)
class ReaderConfig:
    model: ModelFingerprint
    layers: tuple[int, ...]  # hidden-state indices, 0..num_layers (the probe's taps)
    hidden_size: int
    labels: tuple[str, ...]
    unsafe_label: int
    allow_threshold: float
    block_threshold: float
    recent: int = RECENT
    metrics: dict = field(default_factory=dict)

    def __post_init__(self):
        if not self.layers:
            raise OcEngineError("reader config: 'layers' is empty")
        if self.recent < 1:
            raise OcEngineError(f"reader config: 'recent' must be >= 1, got {self.recent}")
        self.verdicts  # noqa: B018 - validates labels and thresholds

    @property
    def verdicts(self) -> ClassifierConfig:
        """The verdict rule, shared with the exchange classifier (thresholds on p_unsafe)."""
        return ClassifierConfig(labels=self.labels, unsafe_label=self.unsafe_label,
                                allow_threshold=self.allow_threshold, block_threshold=self.block_threshold,
                                max_length=8)

    @property
    def feature_size(self) -> int:
        return 3 * len(self.layers) * self.hidden_size

    def to_json(self) -> dict:
        return {"format": READER_FORMAT, **asdict(self), "layers": list(self.layers), "labels": list(self.labels)}


class StateReader:
    """Judges a check from the sequence's pooled states (`submit(..., states=)`); the engine
    hands each token's tapped row to the sequence's `AnswerStates` (see `SequenceMonitor`)."""

    reads_states = True
    backend = "states"

    def __init__(self, path: str | Path, config: ReaderConfig, tensors: dict[str, np.ndarray]):
        import torch

        self.path, self.config = Path(path), config
        # In torch, not numpy: a check runs on the decode thread, and numpy's BLAS would start
        # threads of its own that keep spinning beside decoding (measured: the guard bench's
        # escalating run fell to 0.74x with the worst gap 7x the median).
        self._t = {name: torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))
                   for name, value in tensors.items()}

    # -- checks -------------------------------------------------------------------------
    def probabilities(self, features: np.ndarray) -> np.ndarray:
        """features [N, D] -> class probabilities [N, C]."""
        import torch

        t = self._t
        with torch.inference_mode():
            x = (torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)) - t["mean"]) / t["scale"]
            h = torch.nn.functional.gelu(torch.addmm(t["b1"], x, t["w1"].T), approximate="tanh")
            return torch.softmax(torch.addmm(t["b2"], h, t["w2"].T), dim=-1).numpy()

    def judge_features(self, features: np.ndarray) -> dict:
        start = time.perf_counter()
        p_unsafe = float(self.probabilities(features[None])[0, self.config.unsafe_label])
        return {"verdict": self.config.verdicts.verdict(p_unsafe), "p_unsafe": round(p_unsafe, 6),
                "latency_ms": round((time.perf_counter() - start) * 1000, 3), "backend": self.backend}

    def submit(self, prompt: str, response: str, urgent: bool = False, judged_chars: int = 0, *,
               states: AnswerStates | None = None, covers: int = 0) -> cf.Future:
        """A finished future: the verdict on the answer's first `covers` tokens, from `states`.
        Without states (an engine that does not pass them) the check fails: the guard then fails closed."""
        future: cf.Future = cf.Future()
        try:
            if states is None:
                raise ValueError("a state reader needs the engine's hidden states, and none were passed")
            future.set_result(self.judge_features(states.features(covers, self.config.recent)))
        except Exception as exc:  # noqa: BLE001 - a failed check is an error verdict
            future.set_exception(exc)
        return future

    def close(self) -> None:
        pass

    # -- the model it belongs to ----------------------------------------------------------
    def check_fingerprint(self, actual: ModelFingerprint, layers: tuple[int, ...]) -> None:
        """Raise unless this reader was trained on this model (quantization included) with these taps
        (hidden-state indices, negative from the end)."""
        expected = self.config.model
        layers = tuple(layer % (actual.num_layers + 1) for layer in layers)
        if replace(actual, quantization=None) != replace(expected, quantization=None):
            raise OcEngineError(f"{self.path / CONFIG_FILE}: the state reader was trained for another model "
                                f"({expected.describe()}); this model is {actual.describe()}")
        if actual.quantization != expected.quantization:
            raise OcEngineError(f"{self.path / CONFIG_FILE}: the state reader was trained on the "
                                f"{expected.quantization or 'unquantized'} model and this one is "
                                f"{actual.quantization or 'unquantized'}: train one for it with "
                                f"`oc-engine train-reader{' --quantize ' + actual.quantization if actual.quantization else ''}`")
        if tuple(layers) != self.config.layers:
            raise OcEngineError(f"{self.path / CONFIG_FILE}: the state reader reads layers {list(self.config.layers)} "
                                f"and the probe taps {list(layers)}: train it with that probe")


INPUT_CHECK_NEEDS_TEXT = ("the input check judges the prompt as text: it needs an exchange classifier "
                          "(--classifier embedded:encoder, or an export or delta directory), not a state reader")


def check_state_reader(classifier, model, taps: tuple[int, ...], policy=None) -> None:
    """A state reader must belong to `model` and read the states the probe taps (`taps`); it
    judges answers, so the input check (the prompt alone, as text) needs an exchange
    classifier. Anything else passes."""
    if not getattr(classifier, "reads_states", False):
        return
    classifier.check_fingerprint(ModelFingerprint.of(model), taps)
    if policy is not None and policy.input_check:
        raise OcEngineError(INPUT_CHECK_NEEDS_TEXT)


def load_reader(path: str | Path) -> StateReader:
    """Read and validate a reader directory (see the module docstring)."""
    from safetensors import SafetensorError
    from safetensors.numpy import load_file

    from oc_engine.config_fields import Fields
    from oc_engine.guard.probe import fingerprint_from_fields

    path = Path(path)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / name).is_file():
            raise OcEngineError(f"state reader file is missing: {path / name}")
    where = str(path / CONFIG_FILE)
    try:
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise OcEngineError(f"state reader file is corrupt: {where} ({exc})") from None
    if not isinstance(raw, dict) or raw.get("format") != READER_FORMAT:
        raise OcEngineError(f"{where}: not an oc-engine state reader (format {READER_FORMAT!r} expected)")
    fields = Fields(raw, where)
    try:
        model = fingerprint_from_fields(fields.child("model"), where)
        config = ReaderConfig(model=model, layers=fields.integers("layers"), hidden_size=fields.integer("hidden_size"),
                              labels=fields.strings("labels"), unsafe_label=fields.integer("unsafe_label"),
                              allow_threshold=fields.number("allow_threshold"),
                              block_threshold=fields.number("block_threshold"),
                              recent=fields.integer("recent", RECENT), metrics=fields.mapping("metrics", {}))
    except OcEngineError as exc:
        message = str(exc)
        raise OcEngineError(message if message.startswith(where) else f"{where}: {message}") from None
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as exc:
        raise OcEngineError(f"state reader file is corrupt: {path / WEIGHTS_FILE} ({exc})") from None
    missing = [name for name in TENSORS if name not in tensors]
    if missing:
        raise OcEngineError(f"state reader file is corrupt: {path / WEIGHTS_FILE} (no {', '.join(missing)})")
    tensors = {name: tensors[name].astype(np.float32) for name in TENSORS}
    size, classes = config.feature_size, len(config.labels)
    hidden = tensors["w1"].shape[0] if tensors["w1"].ndim == 2 else -1
    shapes = {"mean": (size,), "scale": (size,), "w1": (hidden, size), "b1": (hidden,), "w2": (classes, hidden),
              "b2": (classes,)}
    for name, shape in shapes.items():
        if tensors[name].shape != shape or hidden < 1:
            raise OcEngineError(f"state reader file is corrupt: {path / WEIGHTS_FILE} ({name} has shape "
                                f"{tensors[name].shape}, {shape} expected from the config)")
        if not np.isfinite(tensors[name]).all():
            raise OcEngineError(f"state reader file is corrupt: {path / WEIGHTS_FILE} ({name} holds non-finite values)")
    if (tensors["scale"] <= 0).any():
        raise OcEngineError(f"state reader file is corrupt: {path / WEIGHTS_FILE} (scale must be positive)")
    return StateReader(path, config, tensors)


def save_reader(config: ReaderConfig, tensors: dict[str, np.ndarray], out: str | Path) -> Path:
    """Write the reader directory atomically (a temporary directory renamed into place)."""
    from safetensors.numpy import save_file

    def write(tmp: Path) -> None:
        save_file({name: np.ascontiguousarray(tensors[name], dtype=np.float32) for name in TENSORS},
                  str(tmp / WEIGHTS_FILE))
        (tmp / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2) + "\n")

    return write_directory(out, write)
