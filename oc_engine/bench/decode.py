"""Decode-speed comparison: Hugging Face generate, a no-KV-cache loop, the engine eager and compiled.

Every mode is timed the same way from outside: a 1-token run gives the time to first
token, a fixed-length N-token run (EOS ignored) gives the rest, and decode speed is
(N - 1) / (t_N - t_1). Each mode is warmed up first (compilation is not timed), then the
median of `repeats` runs is kept. All modes use the same model, dtype and prompt.
"""

from __future__ import annotations

import platform
import statistics
import time
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

import torch

from oc_engine.engine import accel
from oc_engine.engine.prompts import render_prompt
from oc_engine.models.loading import LoadedModel

MODES = ("hf_generate", "no_kv_cache", "engine_eager", "engine_compiled")
GUARD_MODES = ("engine_compiled", "engine_compiled_probe")
BENCH_PROMPT = "Explain SQL injection at a high level"


@dataclass
class ModeResult:
    mode: str
    tokens_per_s: float
    ms_per_token: float
    ttft_ms: float
    ratio_to_hf: float | None = None
    tokens: list[int] | None = None


def _hf_generate(loaded: LoadedModel, prompt: list[int]) -> Callable[[int], list[int]]:
    ids = torch.tensor([prompt], device=loaded.device)

    def run(n: int) -> list[int]:
        out = loaded.model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        return out[0, len(prompt):].tolist()
    return run


def _no_kv_cache(loaded: LoadedModel, prompt: list[int]) -> Callable[[int], list[int]]:
    """The original MVP's loop: re-run the whole sequence for every new token."""
    def run(n: int) -> list[int]:
        ids = torch.tensor([prompt], device=loaded.device)
        for _ in range(n):
            logits = loaded.model(ids, use_cache=False).logits[:, -1]
            ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
        return ids[0, len(prompt):].tolist()
    return run


def bench_llm(loaded: LoadedModel, prompt: list[int], new_tokens: int, *, compile: bool = True, probe=None,
              guard=None, slots: int = 1):
    """An `LLM` over `loaded` with its cache sized to this prompt and `new_tokens`."""
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM
    from oc_engine.params import SamplingParams

    llm = LLM(loaded, EngineConfig(compile=compile, max_num_seqs=slots),
              GuardSetup(probe=probe, classifier=None, policy=guard))
    llm.fit([prompt], SamplingParams(max_tokens=new_tokens))
    return llm


def _engine(loaded: LoadedModel, prompt: list[int], new_tokens: int, compile: bool,
            probe=None) -> Callable[[int], list[int]]:
    from oc_engine.params import SamplingParams

    llm = bench_llm(loaded, prompt, new_tokens, compile=compile, probe=probe)

    def run(n: int) -> list[int]:
        return list(llm.generate([prompt], SamplingParams(max_tokens=n, ignore_eos=True))[0].token_ids)
    return run


def quiet_probe(loaded: LoadedModel, layers: tuple[int, ...] = (-4,)):
    """A random probe on `layers` that never pauses: the probe's cost without the guard's."""
    from oc_engine.guard.probe import ModelFingerprint, Probe, ProbeConfig

    fingerprint = ModelFingerprint.of(loaded.model)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(len(layers), fingerprint.hidden_size, generator=generator) * 0.01
    config = ProbeConfig(model=fingerprint, layers=tuple(layers), hidden_size=fingerprint.hidden_size)
    return Probe(config=config, weight=weight, bias=torch.tensor([-20.0]))


def mode_runner(mode: str, loaded: LoadedModel, prompt: list[int], new_tokens: int) -> Callable[[int], list[int]]:
    """run(n) -> the n greedy tokens that `mode` produces for `prompt` (EOS ignored)."""
    runs = {"hf_generate": lambda: _hf_generate(loaded, prompt),
            "no_kv_cache": lambda: _no_kv_cache(loaded, prompt),
            "engine_eager": lambda: _engine(loaded, prompt, new_tokens, compile=False),
            "engine_compiled": lambda: _engine(loaded, prompt, new_tokens, compile=True),
            "engine_compiled_probe": lambda: _engine(loaded, prompt, new_tokens, compile=True,
                                                     probe=quiet_probe(loaded))}
    return runs[mode]()


def timed_run(run: Callable[[int], list[int]], n: int, device: torch.device) -> tuple[float, list[int]]:
    accel.synchronize(device)
    start = time.perf_counter()
    tokens = run(n)
    accel.synchronize(device)
    return time.perf_counter() - start, tokens


def bench_mode(mode: str, loaded: LoadedModel, prompt: list[int], new_tokens: int, repeats: int) -> ModeResult:
    run = mode_runner(mode, loaded, prompt, new_tokens)
    with torch.inference_mode():
        run(new_tokens)  # warm-up: compilation, allocator, caches
        firsts, fulls, tokens = [], [], None
        for _ in range(repeats):
            firsts.append(timed_run(run, 1, loaded.device)[0])
            elapsed, tokens = timed_run(run, new_tokens, loaded.device)
            fulls.append(elapsed)
    first, full = statistics.median(firsts), statistics.median(fulls)
    # The tokens made, not the tokens asked for: a run stops at the model's context.
    per_token = max(full - first, 1e-9) / max(len(tokens) - 1, 1)
    return ModeResult(mode, 1 / per_token, per_token * 1000, first * 1000, tokens=tokens)


def check_bench_length(loaded: LoadedModel, prompt_tokens: int, new_tokens: int) -> None:
    """Every mode must make exactly `new_tokens` tokens: the prompt and they must fit the context."""
    from oc_engine.errors import OcEngineError

    context = getattr(loaded.model.config.get_text_config(), "max_position_embeddings", None)
    if new_tokens < 2:
        raise OcEngineError(f"new tokens must be >= 2, got {new_tokens}")
    if context and prompt_tokens + new_tokens > context:
        raise OcEngineError(f"{new_tokens} new tokens after the {prompt_tokens}-token bench prompt exceed the "
                            f"model's context of {context} tokens")


def run_decode_bench(loaded: LoadedModel, *, modes=MODES, new_tokens: int = 128, repeats: int = 3,
                     progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark `modes` on `loaded`; returns a JSON-ready dict (environment + one row per mode)."""
    prompt = render_prompt(loaded.tokenizer, BENCH_PROMPT)
    check_bench_length(loaded, len(prompt), new_tokens)
    rows = []
    for mode in modes:
        if progress:
            progress(mode)
        rows.append(bench_mode(mode, loaded, prompt, new_tokens, repeats))
    hf = next((r for r in rows if r.mode == "hf_generate"), None)
    for r in rows:
        r.ratio_to_hf = r.tokens_per_s / hf.tokens_per_s if hf else None
    same_tokens = {r.mode: (r.tokens == hf.tokens) for r in rows} if hf else {}
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **environment(loaded),
        "batch": 1, "prompt_tokens": len(prompt), "new_tokens": new_tokens, "repeats": repeats,
        "greedy_tokens_equal_hf": same_tokens,
        "results": [{k: v for k, v in asdict(r).items() if k != "tokens"} for r in rows],
    }


def environment(loaded: LoadedModel) -> dict:
    """What a result depends on besides the code: model, dtype, quantization, machine, versions."""
    return {"model": loaded.source, "dtype": str(loaded.dtype).removeprefix("torch."),
            "quantization": loaded.quantization, "device": str(loaded.device),
            "cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": package_version("transformers")}


def markdown_table(report: dict) -> str:
    lines = [f"{report['model'].rsplit('/', 1)[-1]}, {report['dtype']}, {report['device']} "
             f"({report['threads']} threads), batch {report['batch']}, {report['new_tokens']} new tokens, "
             f"prompt {report['prompt_tokens']} tokens, torch {report['torch']}, {report['date'][:10]}",
             "",
             "| mode | tokens/s | ms/token | time to first token (ms) | x HF generate | same tokens as HF |",
             "|---|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        ratio = "" if r["ratio_to_hf"] is None else f"{r['ratio_to_hf']:.2f}x"
        same = report["greedy_tokens_equal_hf"].get(r["mode"], "")
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.1f} | {r['ttft_ms']:.0f} "
                     f"| {ratio} | {'yes' if same is True else 'no' if same is False else ''} |")
    return "\n".join(lines)


def package_version(package: str) -> str:
    from importlib.metadata import version

    return version(package)
