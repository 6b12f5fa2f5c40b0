"""Continuous batching against static batches, on the same requests and the same compiled step.

`requests` seeded requests of mixed prompt and answer lengths arrive at random times (a Poisson
process, exponential gaps of mean `arrival_gap_s`). Both runs use one `LLM` with `slots` cache
slots, greedy, EOS ignored (every answer has its asked length, so both runs do the same work):
- continuous: each request is queued when it arrives and joins a free slot between steps;
- static: requests are grouped in arrival order into batches of `slots`; a batch starts when
  its last request has arrived and the previous batch has ended, and runs until its longest
  answer ends (finished rows stay in the step, as in a static batch).
Reported: tokens/s (all generated tokens over the time from the first arrival to the last
token), time to first token from each request's arrival (p50, p99), and the compiled graphs
added after warm-up (recompiles; must be 0). The two runs alternate for `repeats` rounds; the
median round is reported.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import torch

from oc_engine.bench.decode import package_version
from oc_engine.models.loading import LoadedModel
from oc_engine.outputs import Finished
from oc_engine.params import SamplingParams

TOPICS = ("how tides work", "the history of the printing press", "why the sky is blue", "how a compiler works",
          "the water cycle", "how vaccines train the immune system", "the rules of chess", "how bread rises")


@dataclass(frozen=True)
class BenchRequest:
    arrival_s: float  # after the run's start
    prompt: str
    max_tokens: int


def make_requests(count: int, seed: int, arrival_gap_s: float, min_tokens: int = 16,
                  max_tokens: int = 256) -> list[BenchRequest]:
    rng = random.Random(seed)
    requests, now = [], 0.0
    for i in range(count):
        now += rng.expovariate(1 / arrival_gap_s) if i else 0.0
        topic = rng.choice(TOPICS)
        detail = " Explain each step, give an example, and say what is often misunderstood." * rng.randint(0, 12)
        requests.append(BenchRequest(now, f"Explain {topic}.{detail}", rng.randint(min_tokens, max_tokens)))
    return requests


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def run_continuous(llm, requests: list[BenchRequest]) -> dict:
    pending = list(requests)
    start = time.perf_counter()
    added, first_token, last_token, tokens = {}, {}, 0.0, 0
    while pending or llm.has_unfinished():
        now = time.perf_counter() - start
        while pending and pending[0].arrival_s <= now:
            r = pending.pop(0)
            rid = llm.add_request(r.prompt, SamplingParams(max_tokens=r.max_tokens, ignore_eos=True))
            added[rid] = (r, time.perf_counter() - start)
        if not llm.has_unfinished():
            time.sleep(max(0.0, min(pending[0].arrival_s - now, 0.05)))
            continue
        for event in llm.step():
            if isinstance(event, Finished):
                c = event.completion
                tokens += c.generated_tokens
                first_token[c.request_id] = added[c.request_id][1] + c.timings.ttft_ms / 1000  # from its queueing
                last_token = max(last_token, time.perf_counter() - start)
    ttft = [first_token[rid] - r.arrival_s for rid, (r, _) in added.items()]
    return _summary(tokens, last_token - requests[0].arrival_s, ttft)


def run_static(llm, requests: list[BenchRequest], slots: int) -> dict:
    start = time.perf_counter()
    ttft, tokens, last_token = [], 0, 0.0
    for i in range(0, len(requests), slots):
        batch = requests[i:i + slots]
        wait = batch[-1].arrival_s - (time.perf_counter() - start)
        if wait > 0:
            time.sleep(wait)
        called = time.perf_counter() - start
        completions = llm.generate([r.prompt for r in batch],
                                   [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in batch])
        last_token = time.perf_counter() - start
        for r, c in zip(batch, completions):
            tokens += c.generated_tokens
            ttft.append(called + c.timings.ttft_ms / 1000 - r.arrival_s)
    return _summary(tokens, last_token - requests[0].arrival_s, ttft)


def _summary(tokens: int, seconds: float, ttft: list[float]) -> dict:
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 2),
            "ttft_p50_ms": round(percentile(ttft, 50) * 1000, 1), "ttft_p99_ms": round(percentile(ttft, 99) * 1000, 1)}


def run_continuous_bench(loaded: LoadedModel, *, requests: int = 32, slots: int = 8, seed: int = 0,
                         arrival_gap_s: float = 0.25, repeats: int = 1, compile: bool = True,
                         progress: Callable[[str], None] | None = None) -> dict:
    from oc_engine.config import UNGUARDED, EngineConfig
    from oc_engine.engine.prompts import render_prompt
    from oc_engine.llm import LLM

    reqs = make_requests(requests, seed, arrival_gap_s)
    lengths = [len(render_prompt(loaded.tokenizer, r.prompt)) for r in reqs]
    llm = LLM(loaded, EngineConfig(compile=compile, max_num_seqs=slots), UNGUARDED)
    llm.fit([r.prompt for r in reqs], [SamplingParams(max_tokens=r.max_tokens) for r in reqs])
    if progress:
        progress("warm-up (compiles the step)")
    llm.generate([r.prompt for r in reqs[:slots]], SamplingParams(max_tokens=4, ignore_eos=True))
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    rounds = []
    for round_ in range(repeats):
        if progress:
            progress(f"round {round_ + 1}/{repeats}: static batches, then continuous batching")
        static = run_static(llm, reqs, slots)
        continuous = run_continuous(llm, reqs)
        rounds.append({"static": static, "continuous": continuous,
                       "speedup": round(continuous["tokens_per_s"] / static["tokens_per_s"], 3)})
    median = sorted(rounds, key=lambda r: r["speedup"])[len(rounds) // 2]
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": loaded.source,
            "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": package_version("transformers"), "compiled": compile, "requests": requests,
            "slots": slots, "seed": seed, "arrival_gap_s": arrival_gap_s, "max_model_len": llm.max_model_len,
            "prompt_tokens": {"min": min(lengths), "max": max(lengths)},
            "answer_tokens": {"min": min(r.max_tokens for r in reqs), "max": max(r.max_tokens for r in reqs)},
            "recompiles_after_warmup": torch._dynamo.utils.counters["stats"]["unique_graphs"] - graphs,
            "repeats": repeats, "median_round": median, "rounds": rounds}


def continuous_markdown_table(report: dict) -> str:
    r = report["median_round"]
    lines = [f"{report['model'].rsplit('/', 1)[-1]}, {report['dtype']}, {report['device']} ({report['threads']} "
             f"threads), {report['requests']} requests, {report['slots']} slots, mean arrival gap "
             f"{report['arrival_gap_s']} s, answers {report['answer_tokens']['min']}-{report['answer_tokens']['max']} "
             f"tokens, torch {report['torch']}, {report['date'][:10]}", "",
             "| run | tokens/s | TTFT p50 (ms) | TTFT p99 (ms) | seconds |", "|---|---:|---:|---:|---:|"]
    for name in ("static", "continuous"):
        s = r[name]
        lines.append(f"| {name} | {s['tokens_per_s']:.1f} | {s['ttft_p50_ms']:.0f} | {s['ttft_p99_ms']:.0f} "
                     f"| {s['seconds']:.1f} |")
    lines += ["", f"continuous / static throughput: {r['speedup']:.2f}x; recompiles after warm-up: "
              f"{report['recompiles_after_warmup']}"]
    return "\n".join(lines)
