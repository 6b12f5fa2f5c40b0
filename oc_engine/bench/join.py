"""`oc-engine bench join`: what one long prompt joining costs the answers already streaming.

One `LLM` (unguarded, `slots` cache slots). Per round: `slots - 1` requests decode until each
has `warm_tokens` tokens, then one prompt of `prompt_tokens` tokens joins, and decoding goes on
until it has its first token and `after_tokens` more steps have run. The gaps between the
running requests' tokens (the time between two tokens of one request, as its host saw them)
are measured from the join to the end of the round, and before the join for reference. The
rounds are run for each prefill chunk size (`EngineConfig.prefill_chunk`; 0: a prompt at once),
round-robin, `repeats` times.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

from oc_engine.bench.stats import ms, quantile
from oc_engine.params import SamplingParams


def long_prompt_ids(tokenizer, tokens: int) -> list[int]:
    """`tokens` token ids of plain English (a license text, repeated as needed)."""
    from pathlib import Path

    text = Path("/usr/share/common-licenses/GPL-3")
    words = text.read_text(encoding="utf-8") if text.exists() else "The quick brown fox jumps over the lazy dog. " * 400
    ids = tokenizer(words)["input_ids"]
    while len(ids) < tokens:
        ids = ids + ids
    return ids[:tokens]


def run_round(llm, prompts: list[str], long_ids: list[int], warm_tokens: int, after_tokens: int) -> dict:
    engine = llm.engine
    running = [engine.requests[llm.add_request(p, SamplingParams(max_tokens=4096, ignore_eos=True, temperature=0))]
               for p in prompts]
    while min(len(s.token_ids) for s in running) < warm_tokens:
        llm.step()
    joined_at = time.perf_counter()
    joining = engine.requests[llm.add_request(long_ids, SamplingParams(max_tokens=after_tokens + 1,
                                                                        ignore_eos=True, temperature=0))]
    steps = 0
    while joining.first_token_at is None or steps < after_tokens:
        llm.step()
        steps += joining.first_token_at is not None
    ended_at = time.perf_counter()
    for seq in running:
        llm.cancel(seq.request_id)
    while llm.has_unfinished():
        llm.step()
    during, before = [], []
    for seq in running:
        times = seq.token_times
        for a, b in zip(times, times[1:]):
            if b > joined_at and a < ended_at:
                during.append(b - a)
            elif b <= joined_at:
                before.append(b - a)
    return {"during": during, "before": before, "ttft_s": joining.first_token_at - joined_at}


def run_join_bench(llm, prompts: list[str], *, chunks: tuple[int, ...], prompt_tokens: int = 1500,
                   repeats: int = 3, warm_tokens: int = 16, after_tokens: int = 32,
                   progress: Callable[[str], None] = lambda s: None) -> dict:
    slots = llm.capacity
    long_ids = long_prompt_ids(llm.tokenizer, prompt_tokens)
    running = [prompts[i % len(prompts)] for i in range(slots - 1)]
    gaps = {chunk: {"during": [], "before": [], "ttft_s": []} for chunk in chunks}
    for repeat in range(repeats):
        for chunk in chunks:
            progress(f"round {repeat + 1}/{repeats}, prefill chunk {chunk or 'off'}")
            llm.engine.prefill_chunk = chunk or None
            result = run_round(llm, running, long_ids, warm_tokens, after_tokens)
            gaps[chunk]["during"] += result["during"]
            gaps[chunk]["before"] += result["before"]
            gaps[chunk]["ttft_s"].append(result["ttft_s"])
    rows = []
    for chunk in chunks:
        during, before = gaps[chunk]["during"], gaps[chunk]["before"]
        rows.append({"prefill_chunk": chunk or None, "gaps": len(during),
                     "gap_ms_before": {"p50": _ms_at(before, 0.5)},
                     "gap_ms_during": {"p50": _ms_at(during, 0.5), "p99": _ms_at(during, 0.99),
                                       "max": _ms_at(during, 1.0)},
                     "p99_over_p50_before": round(_ms_at(during, 0.99) / _ms_at(before, 0.5), 2),
                     "joining_ttft_s": round(statistics.median(gaps[chunk]["ttft_s"]), 3)})
    return {"bench": "join", "date": time.strftime("%Y-%m-%d"), "slots": slots, "running": slots - 1,
            "prompt_tokens": prompt_tokens, "repeats": repeats, "warm_tokens": warm_tokens,
            "after_tokens": after_tokens, "results": rows}


def _ms_at(values: list[float], q: float) -> float:
    value = quantile(values, q)
    return float("nan") if value is None else ms(value)


def join_markdown_table(report: dict) -> str:
    lines = [f"{report['running']} answers streaming ({report['slots']} slots), one {report['prompt_tokens']}-token "
             f"prompt joins; gaps between each running answer's tokens ({report['repeats']} rounds):", "",
             "| prefill chunk | gaps | before: p50 ms | during: p50 ms | p99 ms | max ms | p99 / p50 before "
             "| joining TTFT s |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["results"]:
        during = r["gap_ms_during"]
        lines.append(f"| {r['prefill_chunk'] or 'off (a prompt at once)'} | {r['gaps']} | "
                     f"{r['gap_ms_before']['p50']} | {during['p50']} | {during['p99']} | {during['max']} | "
                     f"{r['p99_over_p50_before']} | {r['joining_ttft_s']} |")
    return "\n".join(lines)
