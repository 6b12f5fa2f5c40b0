"""What quantization costs in quality: greedy answers against the unquantized engine, and
perplexity on a fixed text beside llama.cpp's on the GGUF file.

Greedy agreement: every prompt answered greedily by the unquantized engine and by each
quantized one; reported as the share of answers identical token for token, and the mean share
of each answer's tokens before the first difference. Perplexity is computed as llama.cpp's
`llama-perplexity` does: the text cut into windows of `context` tokens, each window's second
half scored given its first.
"""

from __future__ import annotations

import math
import re
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

from oc_engine.errors import OcEngineError

DEFAULT_TEXT = "/usr/share/common-licenses/GPL-3"  # a fixed English text on every Debian machine


def run_quality_bench(model: str | None, *, dtype: str, device: str, quantizations: list[str], prompts: list[str],
                      max_tokens: int = 64, text: str = DEFAULT_TEXT, context: int = 512, batch_size: int = 8,
                      llama_cpp: str | None = None, progress: Callable[[str], None] = lambda m: None) -> dict:
    from oc_engine.bench.decode import environment
    from oc_engine.models.loading import load_model

    text_value = _read_text(text)
    gguf = None
    if llama_cpp is not None:  # fails before anything loads
        from oc_engine.bench.quantized import gguf_for

        gguf = gguf_for(model)
        _perplexity_binary(llama_cpp)
    answers, perplexities, env = {}, {}, None
    for quantization in ["none"] + [q for q in quantizations if q != "none"]:
        progress(f"{quantization}: {len(prompts)} greedy answers and the perplexity")
        loaded = load_model(model, device=device, dtype=dtype, quantize=quantization, progress=False)
        env = env or environment(loaded)
        answers[quantization] = _greedy(loaded, prompts, max_tokens, batch_size)
        perplexities[quantization] = round(perplexity(loaded, text_value, context), 4)
        del loaded
    reference = answers["none"]
    rows = [{"quantization": q, "perplexity": perplexities[q], **_agreement(reference, answers[q])}
            for q in answers]
    if gguf is not None:
        progress("llama.cpp's perplexity on the GGUF")
        rows.append({"quantization": f"llama.cpp {Path(gguf).name}",
                     "perplexity": llama_perplexity(llama_cpp, gguf, text, context)})
    env.pop("quantization", None)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **env, "prompts": len(prompts),
            "max_tokens": max_tokens, "text": text, "context": context, "results": rows}


def perplexity(loaded, text: str, context: int) -> float:
    """exp(mean NLL) over the second half of each `context`-token window of `text`."""
    ids = loaded.tokenizer(text, add_special_tokens=True, return_tensors="pt").input_ids[0]
    windows = len(ids) // context
    if windows < 1:
        raise OcEngineError(f"the text has {len(ids)} tokens, fewer than one window of {context}")
    total, count = 0.0, 0
    with torch.inference_mode():
        for w in range(windows):
            chunk = ids[w * context:(w + 1) * context][None].to(loaded.device)
            logits = loaded.model(chunk, use_cache=False).logits[0].float()
            half = context // 2
            nll = torch.nn.functional.cross_entropy(logits[half - 1:-1], chunk[0, half:], reduction="sum")
            total, count = total + float(nll), count + context - half
    return math.exp(total / count)


def llama_perplexity(llama_cpp: str, gguf, text: str, context: int) -> float:
    """llama.cpp's own `llama-perplexity` (beside its server binary) on the same text."""
    from oc_engine.bench.llama_cpp import llama_environment

    binary = _perplexity_binary(llama_cpp)
    with llama_environment(binary) as env:
        done = subprocess.run([str(binary), "-m", str(gguf), "-f", text, "-c", str(context), "-t",
                               str(torch.get_num_threads())], env=env, capture_output=True, text=True, timeout=1800)
    found = re.search(r"Final estimate: PPL = ([0-9.]+)", done.stdout + done.stderr)
    if done.returncode != 0 or not found:
        tail = (done.stdout + done.stderr).strip().splitlines()[-2:]
        raise OcEngineError(f"llama-perplexity failed ({done.returncode}): {' | '.join(tail)}")
    return float(found.group(1))


def _perplexity_binary(llama_cpp: str) -> Path:
    from oc_engine.bench.llama_cpp import find_llama_server

    binary = find_llama_server(llama_cpp).with_name("llama-perplexity")
    if not binary.is_file():
        raise OcEngineError(f"no llama-perplexity beside {binary.parent}")
    return binary


def _greedy(loaded, prompts: list[str], max_tokens: int, batch_size: int) -> list[list[int]]:
    from oc_engine.config import UNGUARDED, EngineConfig
    from oc_engine.llm import LLM
    from oc_engine.params import SamplingParams

    params = SamplingParams(max_tokens=max_tokens)
    with LLM(loaded, EngineConfig(max_num_seqs=batch_size), UNGUARDED) as llm:
        llm.fit(prompts, params)
        return [list(c.token_ids) for c in llm.generate(prompts, params)]


def _agreement(reference: list[list[int]], answers: list[list[int]]) -> dict:
    identical, prefix = 0, 0.0
    for ref, got in zip(reference, answers):
        identical += ref == got
        same = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), min(len(ref), len(got)))
        prefix += same / max(len(ref), 1)
    n = max(len(reference), 1)
    return {"identical_answers": round(identical / n, 4), "mean_prefix_agreement": round(prefix / n, 4)}


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise OcEngineError(f"cannot read the perplexity text {path}: {exc} (give --text FILE)") from exc


def quality_markdown(report: dict) -> str:
    lines = [f"{report['model'].rsplit('/', 1)[-1]}, {report['dtype']} activations, {report['prompts']} prompts x "
             f"{report['max_tokens']} greedy tokens, perplexity on {Path(report['text']).name} "
             f"(windows of {report['context']}), {report['date'][:10]}", "",
             "| weights | identical answers | mean agreeing prefix | perplexity |", "|---|---:|---:|---:|"]
    for r in report["results"]:
        ident = f"{r['identical_answers']:.1%}" if "identical_answers" in r else ""
        prefix = f"{r['mean_prefix_agreement']:.1%}" if "mean_prefix_agreement" in r else ""
        lines.append(f"| {r['quantization'].replace('none', 'unquantized')} | {ident} | {prefix} | "
                     f"{r['perplexity']:.3f} |")
    return "\n".join(lines)
