"""Start-up to the first token, timed from outside, and where it goes.

    uv run python bench/profile_startup.py [--runs 3] [--compile]     # the CLI, from outside
    uv run python bench/profile_startup.py --phases                   # one process, phase by phase

The first form starts `oc-engine generate` (no `uv run` around it: that adds uv's own check)
and times the first non-blank byte on its stdout and the whole run. The second times what that
command does, in order: import torch, the CLI, transformers, the tokenizer, the model's code,
its weights, the engine, the first token. Whether installed packages carry compiled bytecode
is printed: where Python may not write it (PYTHONDONTWRITEBYTECODE), every start compiles
torch's and transformers' sources again unless `uv sync --compile-bytecode` ran.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "Write a haiku about caching"


def bytecode_state() -> dict:
    import importlib.util

    spec = importlib.util.find_spec("transformers")
    cached = Path(spec.origin).parent / "__pycache__"
    return {"PYTHONDONTWRITEBYTECODE": bool(os.environ.get("PYTHONDONTWRITEBYTECODE")),
            "site_packages_bytecode": cached.is_dir() and any(cached.glob("*.pyc"))}


def from_outside(runs: int, compile: bool) -> list[dict]:
    command = [sys.executable, "-m", "oc_engine.cli", "generate", "--prompt", PROMPT, "--max-new-tokens", "16"]
    if not compile:
        command.append("--no-compile")
    results = []
    for _ in range(runs):
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        first = None
        while byte := process.stdout.read(1):
            if first is None and not byte.isspace():
                first = time.perf_counter() - start
        if process.wait() != 0:
            raise SystemExit(f"{' '.join(command)} failed")
        results.append({"first_token_s": round(first, 2), "wall_s": round(time.perf_counter() - start, 2)})
    return results


def phases() -> dict:
    start = last = time.perf_counter()
    out = {}

    def mark(name):
        nonlocal last
        now = time.perf_counter()
        out[name] = round(now - last, 2)
        last = now

    import torch
    mark("import torch")
    import oc_engine.cli.generate  # noqa: F401
    mark("import the CLI")
    from transformers import AutoModelForCausalLM, AutoTokenizer
    mark("import transformers' auto classes")
    from oc_engine.models.loading import resolve_dtype, resolve_model_source
    path = resolve_model_source(None, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    mark("tokenizer (its config imports transformers' model loading)")
    import transformers.models.llama.modeling_llama  # noqa: F401
    mark("import the model's code")
    dtype = resolve_dtype(None, torch.device("cpu"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True).eval()
    mark(f"weights ({dtype})")
    from oc_engine.config import UNGUARDED, EngineConfig
    from oc_engine.llm import LLM
    from oc_engine.models.loading import LoadedModel
    from oc_engine.params import SamplingParams
    llm = LLM(LoadedModel(model, tokenizer, path, torch.device("cpu"), dtype), EngineConfig(compile=False), UNGUARDED)
    mark("the engine")
    next(iter(llm.stream(PROMPT, SamplingParams(max_tokens=1))))
    mark("the first token")
    out["total"] = round(time.perf_counter() - start, 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="without --no-compile")
    parser.add_argument("--phases", action="store_true", help="phase by phase, in this process")
    args = parser.parse_args()
    report = {"bytecode": bytecode_state()}
    if args.phases:
        report["phases_s"] = phases()
    else:
        report["runs"] = from_outside(args.runs, args.compile)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
