"""A load as a client sees it: the `openai` client, in a process of its own, streaming chat
requests from `concurrency` clients (each sends its next request when its last one ends).

Run by `oc-engine bench serve` as `python -m oc_engine.bench.openai_load PLAN.json`; prints
one JSON object. Every number is what the client measured: wall time from the first request
sent to the last token received (TTFT included), the tokens it was shown (`usage`, else a count
of content chunks), time to first content and the gaps between content chunks. Where the server
says how many tokens it generated (oc-engine with `--guard-details`), that count is kept too, to
tell the tokens a guard held back from the ones it showed.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import dataclass, field

from oc_engine.bench.stats import ms, quantile, steady_rate


@dataclass
class Seen:
    start: float
    first: float | None = None
    chunks: list[float] = field(default_factory=list)
    shown_tokens: int = 0
    generated_tokens: int | None = None
    finish: str | None = None
    end: float = 0.0


async def _one(client, model: str, prompt: str, max_tokens: int) -> Seen:
    seen = Seen(time.perf_counter())
    stream = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0,
        stream=True, stream_options={"include_usage": True})
    usage = None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage.completion_tokens
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if choice.delta is not None and choice.delta.content:
            now = time.perf_counter()
            seen.first = seen.first or now
            seen.chunks.append(now)
        if choice.finish_reason:
            seen.finish = choice.finish_reason
            report = (chunk.model_extra or {}).get("oc_engine") or {}
            seen.generated_tokens = report.get("generated_tokens")
    seen.shown_tokens = usage if usage is not None else len(seen.chunks)
    seen.end = time.perf_counter()
    return seen


async def run(plan: dict) -> dict:
    import httpx
    import openai

    prompts, concurrency, requests = plan["prompts"], plan["concurrency"], plan["requests"]
    queue = list(reversed([prompts[i % len(prompts)] for i in range(requests)]))
    seen: list[Seen] = []
    client_done: list[float] = []
    http = httpx.AsyncClient(limits=httpx.Limits(max_connections=concurrency + 2), timeout=600)
    client = openai.AsyncOpenAI(base_url=plan["base"] + "/v1", api_key=plan.get("api_key") or "unused",
                                max_retries=0, http_client=http)

    async def worker():
        while queue:
            seen.append(await _one(client, plan["model"], queue.pop(), plan["max_tokens"]))
        client_done.append(time.perf_counter())

    start = time.perf_counter()
    async with client:
        await asyncio.gather(*(worker() for _ in range(concurrency)))
    last_token = max((s.chunks[-1] for s in seen if s.chunks), default=time.perf_counter())
    return summarize(seen, start, last_token, min(client_done), concurrency, requests)


def summarize(seen: list[Seen], start: float, last_token: float, first_client_done: float, concurrency: int,
              requests: int) -> dict:
    wall = last_token - start
    shown = sum(s.shown_tokens for s in seen)
    generated = [s.generated_tokens for s in seen if s.generated_tokens is not None]
    ttft = [s.first - s.start for s in seen if s.first is not None]
    gaps = [b - a for s in seen for a, b in zip(s.chunks, s.chunks[1:])]
    steady = steady_rate([(s.shown_tokens, s.start, s.end) for s in seen], start, first_client_done)
    finishes: dict[str, int] = {}
    for s in seen:
        finishes[s.finish or "none"] = finishes.get(s.finish or "none", 0) + 1
    return {"concurrency": concurrency, "requests": requests, "wall_s": round(wall, 3), "shown_tokens": shown,
            "generated_tokens": sum(generated) if len(generated) == len(seen) else None,
            "tokens_per_s": round(shown / wall, 2), "steady_tokens_per_s": steady,
            "finish_reasons": finishes,
            "ttft_ms": {"p50": ms(quantile(ttft, 0.5)), "p99": ms(quantile(ttft, 0.99))},
            "chunk_gap_ms": {"p50": ms(quantile(gaps, 0.5)), "p99": ms(quantile(gaps, 0.99))}}


def main(argv: list[str]) -> None:
    with open(argv[0], encoding="utf-8") as f:
        plan = json.load(f)
    print(json.dumps(asyncio.run(run(plan))))


if __name__ == "__main__":
    main(sys.argv[1:])
