"""A first run looks like oc-engine, not like its libraries: with an empty cache (the model is
converted, the classifier built and exported to ONNX), a fresh `generate` prints only
oc-engine's own lines on stderr; `--verbose` lets the libraries' output through."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def _generate(cache, *extra):
    env = {**os.environ, "OC_ENGINE_CACHE": str(cache)}
    for name in ("TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS", "TORCH_LOGS"):
        env.pop(name, None)  # as a user's shell has them: unset
    return subprocess.run([sys.executable, "-m", "oc_engine.cli", "generate", "--prompt", "Name a fruit.",
                           "--max-new-tokens", "4", "--no-compile", "--dtype", "float32", *extra],
                          env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_a_fresh_generate_prints_only_its_own_lines(tmp_path, monkeypatch):
    # The exchange classifier is the noisiest first use (a transformers load report, an ONNX
    # export), so it is asked for; the default second stage (the state reader) loads a subset.
    result = _generate(tmp_path / "cache", "--classifier", "embedded:encoder")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("oc-engine: ") for line in lines), result.stderr
    assert any("converting" in line for line in lines) and any("building the classifier" in line for line in lines)


@pytest.mark.slow
def test_verbose_lets_the_libraries_talk(tmp_path):
    result = _generate(tmp_path / "cache", "--verbose")  # the model is converted again: a progress bar
    assert result.returncode == 0, result.stderr
    assert any(not line.startswith("oc-engine: ") for line in result.stderr.splitlines() if line.strip())
