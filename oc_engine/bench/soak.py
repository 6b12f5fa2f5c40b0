"""`oc-engine bench soak`: a bounded soak of a started server on loopback.

`clients` clients send requests back to back until `duration_s` passes or `max_requests` have
been sent, each request's kind taken in turn from `KINDS`: good ones (streamed, whole,
slow-reading), guard-blocked ones (harmful prompts, streamed), and bad ones (malformed JSON,
a body over the server's limit, a message over its limit, no API key, a client that hangs up
after the first chunk). Every response is classified: `complete` (a 200 with its whole body,
or a stream that ends with its finish chunk and [DONE]), `clean_error` (OpenAI's error JSON, or
a stream whose last chunk is one), `disconnected` (the client hung up on purpose), or `broken`
(anything else: the target is none). The server's RSS is sampled as it runs; its growth is
measured from the end of the warm-up (the first `warmup_share` of the run). Afterwards the
audit log is read back: every error answered to a client with a key has its `error` line,
every blocked answer its `block` line, and every `request` line its `end` line.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

KINDS = ("stream", "whole", "blocked", "malformed", "stream", "oversized", "slow_reader", "too_long",
         "unauthenticated", "disconnect", "blocked", "stream")
MAX_TOKENS = 24


@dataclass
class Outcome:
    kind: str
    result: str  # complete, clean_error, disconnected, broken
    seconds: float
    status: int | None = None
    request_id: str | None = None
    finish_reason: str | None = None
    detail: str = ""
    code: str | None = None  # an error's OpenAI `code`


@dataclass
class SoakPlan:
    base: str
    api_key: str
    benign: list[str]
    harmful: list[str]
    max_body_bytes: int
    max_message_chars: int
    clients: int = 32
    duration_s: float = 600.0
    max_requests: int = 100_000
    sent: int = 0
    outcomes: list[Outcome] = field(default_factory=list)


async def _request(client, plan: SoakPlan, kind: str, n: int) -> Outcome:
    url = f"{plan.base}/v1/chat/completions"
    auth = {"authorization": f"Bearer {plan.api_key}"}
    pool = plan.harmful if kind == "blocked" else plan.benign
    prompt = pool[n % len(pool)]
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": MAX_TOKENS, "temperature": 0,
            "stream": kind in ("stream", "blocked", "slow_reader", "disconnect")}
    start = time.perf_counter()
    outcome = Outcome(kind, "broken", 0.0)
    try:
        if kind == "malformed":
            response = await client.post(url, content=b'{"messages": [', headers={**auth, "content-type":
                                                                                   "application/json"})
            _judge_whole(outcome, response)
        elif kind == "oversized":
            response = await client.post(url, content=b" " * (plan.max_body_bytes + 1),
                                         headers={**auth, "content-type": "application/json"})
            _judge_whole(outcome, response)
        elif kind == "too_long":
            body["messages"][0]["content"] = "a" * (plan.max_message_chars + 1)
            _judge_whole(outcome, await client.post(url, json=body, headers=auth))
        elif kind == "unauthenticated":
            _judge_whole(outcome, await client.post(url, json=body))
        elif kind == "whole":
            _judge_whole(outcome, await client.post(url, json=body, headers=auth))
        else:
            async with client.stream("POST", url, json=body, headers=auth) as response:
                outcome.status = response.status_code
                outcome.request_id = response.headers.get("x-request-id")
                if response.status_code != 200:
                    _judge_error(outcome, await response.aread())
                else:
                    await _read_stream(outcome, response, kind)
    except Exception as exc:  # noqa: BLE001 - a soak counts every failure as what it is: broken
        outcome.result, outcome.detail = "broken", f"{type(exc).__name__}: {exc}"[:300]
    outcome.seconds = time.perf_counter() - start
    return outcome


async def _read_stream(outcome: Outcome, response, kind: str) -> None:
    payloads = []
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        payloads.append(line[6:])
        if kind == "disconnect":
            outcome.result = "disconnected"
            return  # leaving the `stream` block closes the connection mid-answer
        if kind == "slow_reader":
            await asyncio.sleep(0.05)
    if len(payloads) < 2 or payloads[-1] != "[DONE]":
        outcome.detail = f"the stream ended without [DONE] after {len(payloads)} chunks"
        return
    last = json.loads(payloads[-2])
    if "error" in last:
        outcome.result, outcome.detail = "clean_error", last["error"].get("message", "")[:200]
        return
    finishes = [c["choices"][0]["finish_reason"] for c in map(json.loads, payloads[:-1])
                if c.get("choices") and c["choices"][0].get("finish_reason")]
    if len(finishes) == 1:
        outcome.result, outcome.finish_reason = "complete", finishes[0]
    else:
        outcome.detail = f"{len(finishes)} finish chunks"


def _judge_whole(outcome: Outcome, response) -> None:
    outcome.status = response.status_code
    outcome.request_id = response.headers.get("x-request-id")
    if response.status_code == 200:
        try:
            body = response.json()
            outcome.finish_reason = body["choices"][0]["finish_reason"]
            outcome.result = "complete"
        except (ValueError, KeyError, IndexError) as exc:
            outcome.detail = f"a 200 without a completion: {exc}"
    else:
        _judge_error(outcome, response.content)


def _judge_error(outcome: Outcome, content: bytes) -> None:
    try:
        error = json.loads(content)["error"]
        if isinstance(error["message"], str) and error["type"]:
            outcome.result, outcome.detail, outcome.code = "clean_error", error["message"][:200], error.get("code")
            return
    except (ValueError, KeyError, TypeError):
        pass
    outcome.detail = f"HTTP {outcome.status} without OpenAI's error JSON: {content[:200]!r}"


async def run_soak_load(plan: SoakPlan, rss: Callable[[], int] | None = None, progress=None) -> dict:
    """Drive the server; returns the outcomes' summary and the RSS samples (seconds, bytes)."""
    import httpx

    samples: list[tuple[float, int]] = []
    start = time.perf_counter()
    deadline = start + plan.duration_s

    async def client_loop(client):
        while time.perf_counter() < deadline and plan.sent < plan.max_requests:
            n = plan.sent
            plan.sent += 1
            plan.outcomes.append(await _request(client, plan, KINDS[n % len(KINDS)], n))

    async def sampler():
        last_report = start
        while time.perf_counter() < deadline and plan.sent < plan.max_requests:
            if rss is not None:
                samples.append((round(time.perf_counter() - start, 1), rss()))
            if progress and time.perf_counter() - last_report >= 30:
                last_report = time.perf_counter()
                progress(f"{last_report - start:.0f} s: {len(plan.outcomes)} requests answered")
            await asyncio.sleep(min(5.0, plan.duration_s / 20))

    limits = httpx.Limits(max_connections=plan.clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(300.0), limits=limits) as client:
        sampling = asyncio.ensure_future(sampler())
        await asyncio.gather(*(client_loop(client) for _ in range(plan.clients)))
        sampling.cancel()
    wall = time.perf_counter() - start
    if rss is not None:
        samples.append((round(wall, 1), rss()))
    return {"wall_s": round(wall, 1), "rss_samples": samples}


def summarize(plan: SoakPlan, load: dict, warmup_share: float = 0.2) -> dict:
    outcomes = plan.outcomes
    results = Counter(o.result for o in outcomes)
    by_kind = {kind: dict(Counter(o.result for o in outcomes if o.kind == kind)) for kind in dict.fromkeys(KINDS)}
    good = sorted(o.seconds for o in outcomes if o.result == "complete")
    samples = load["rss_samples"]
    rss = None
    if samples:
        warm = [b for t, b in samples if t >= warmup_share * load["wall_s"]] or [samples[-1][1]]
        rss = {"start_bytes": samples[0][1], "after_warmup_bytes": warm[0], "end_bytes": samples[-1][1],
               "max_bytes": max(b for _, b in samples),
               "growth_after_warmup": round(samples[-1][1] / warm[0] - 1, 4)}
    return {"requests": len(outcomes), "wall_s": load["wall_s"], "clients": plan.clients,
            "results": dict(results), "by_kind": by_kind,
            "errors_by_status": dict(Counter(str(o.status) for o in outcomes if o.result == "clean_error")),
            "finish_reasons": dict(Counter(o.finish_reason for o in outcomes if o.finish_reason)),
            "latency_s": {"p50": _quantile(good, 0.5), "p99": _quantile(good, 0.99)},
            "broken": [{"kind": o.kind, "detail": o.detail} for o in outcomes if o.result == "broken"][:20],
            "rss": rss, "rss_samples": samples}


def check_audit(paths: list[Path], outcomes: list[Outcome]) -> dict:
    """What the audit log lost: an error answered to a client with a key without its `error`
    line, a blocked answer without its `block` line, a `request` line without its `end`. (A
    401, and a 503 past the concurrency limit, are refused before the key is read: counted,
    not logged.)"""
    lines = [json.loads(line) for path in paths if path.exists() for line in path.read_text().splitlines()]
    by_event: dict[str, set] = {}
    for line in lines:
        by_event.setdefault(line["event"], set()).add(line["request_id"])
    errors = {o.request_id for o in outcomes if o.result == "clean_error" and o.request_id and o.status != 401
              and o.code != "too_many_requests_in_progress"}
    blocked = {o.request_id for o in outcomes if o.finish_reason == "content_filter" and o.request_id}
    opened, ended = by_event.get("request", set()), by_event.get("end", set())
    missing = {"error": sorted(errors - by_event.get("error", set())),
               "block": sorted(blocked - by_event.get("block", set())), "end": sorted(opened - ended)}
    return {"lines": len(lines), "files": len([p for p in paths if p.exists()]),
            "lines_by_event": {event: len(ids) for event, ids in by_event.items()},
            "expected": {"error": len(errors), "block": len(blocked), "end": len(opened)},
            "lost": sum(len(ids) for ids in missing.values()), "missing": {k: v[:10] for k, v in missing.items()},
            "unauthenticated_logged": sum(1 for o in outcomes if o.status == 401 and o.request_id in
                                          by_event.get("error", set()))}


def soak_report(summary: dict, audit: dict, settings: dict) -> dict:
    targets = {"broken": {"value": summary["results"].get("broken", 0), "target": 0},
               "audit_lines_lost": {"value": audit["lost"], "target": 0},
               "rss_growth_after_warmup": {"value": (summary["rss"] or {}).get("growth_after_warmup"),
                                           "target": "< 0.05"}}
    for target in targets.values():
        value = target["value"]
        target["met"] = value is not None and (value == 0 if target["target"] == 0 else value < 0.05)
    return {"bench": "soak", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": settings, **summary, "audit": audit, "targets": targets}


def soak_markdown_table(report: dict) -> str:
    lines = [f"Soak: {report['requests']} requests by {report['clients']} clients in {report['wall_s']} s", "",
             "| kind | complete | clean error | disconnected | broken |", "|---|---:|---:|---:|---:|"]
    for kind, counts in report["by_kind"].items():
        lines.append(f"| {kind} | {counts.get('complete', 0)} | {counts.get('clean_error', 0)} | "
                     f"{counts.get('disconnected', 0)} | {counts.get('broken', 0)} |")
    rss = report["rss"] or {}
    mib = lambda b: f"{b / 2 ** 20:.0f} MiB" if b else "-"  # noqa: E731
    lines += ["", f"Latency of complete answers: p50 {report['latency_s']['p50']} s, p99 {report['latency_s']['p99']} s",
              f"Errors by status: {json.dumps(report['errors_by_status'])}; finish reasons: "
              f"{json.dumps(report['finish_reasons'])}",
              f"Server RSS: {mib(rss.get('start_bytes'))} at the start, {mib(rss.get('after_warmup_bytes'))} after "
              f"warm-up, {mib(rss.get('end_bytes'))} at the end (growth {rss.get('growth_after_warmup')})",
              f"Audit log: {report['audit']['lines']} lines in {report['audit']['files']} files, "
              f"{report['audit']['lost']} lost ({json.dumps(report['audit']['expected'])} expected)", ""]
    lines += [f"{name}: {t['value']} (target {t['target']}: {'met' if t['met'] else 'not met'})"
              for name, t in report["targets"].items()]
    return "\n".join(lines)


def run_soak_bench(*, clients: int, duration_s: float, max_requests: int, dtype: str, data_dir: Path,
                   log_dir: Path, slots: int = 8, backend: str = "native", progress=lambda s: None) -> dict:
    """Start a guarded `oc-engine serve` (API key, audit log, tighter limits so that the bad
    requests stay cheap), soak it, stop it with SIGTERM, and read its audit log back."""
    import secrets
    import sys

    from oc_engine.bench.serve import free_port, jbb_prompts, start_server, stop_server, wait_healthy

    benign, harmful = jbb_prompts(data_dir, "benign"), jbb_prompts(data_dir, "harmful")
    port, key = free_port(), "sk-soak-" + secrets.token_hex(8)
    audit = log_dir / "audit.jsonl"
    settings = {"backend": backend, "clients": clients, "duration_s": duration_s, "max_requests": max_requests,
                "dtype": dtype,
                "slots": slots, "max_tokens": MAX_TOKENS, "max_body_bytes": 2 ** 20, "max_message_chars": 65536,
                "audit_max_bytes": 2 ** 20, "kinds": list(KINDS)}
    command = [sys.executable, "-m", "oc_engine.cli", "serve", "--port", str(port), "--dtype", dtype,
               "--max-num-seqs", str(slots), "--max-waiting", str(4 * clients), "--api-key", key,
               "--audit-log", str(audit), "--audit-max-bytes", str(settings["audit_max_bytes"]),
               "--audit-backups", "1000", "--max-body-bytes", str(settings["max_body_bytes"]),
               "--max-message-chars", str(settings["max_message_chars"]), "--log-level", "warning",
               "--backend", backend]
    log = log_dir / "server.log"
    progress(f"starting the server (log {log})")
    proc = start_server(command, log)
    base = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(base, proc, log)
        plan = SoakPlan(base=base, api_key=key, benign=benign, harmful=harmful,
                        max_body_bytes=settings["max_body_bytes"], max_message_chars=settings["max_message_chars"],
                        clients=clients, duration_s=duration_s, max_requests=max_requests)
        progress(f"soaking: {clients} clients for {duration_s:.0f} s (at most {max_requests} requests)")
        load = asyncio.run(run_soak_load(plan, rss=lambda: _rss(proc.pid), progress=progress))
    finally:
        stop_server(proc)
    settings["exit_code"] = proc.returncode
    paths = [audit] + sorted(log_dir.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    return soak_report(summarize(plan, load), check_audit(paths, plan.outcomes), settings)


def _rss(pid: int) -> int:
    """The resident set of a process and all its descendants, in bytes (Linux): vLLM runs its
    engine core in a child process."""
    children: dict[int, list[int]] = {}
    for stat_file in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat_file.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # it exited meanwhile
        children.setdefault(int(fields[1]), []).append(int(stat_file.parent.name))
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        todo += children.get(current, [])
        try:
            for line in Path(f"/proc/{current}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            continue
    return total


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return round(values[min(len(values) - 1, int(q * (len(values) - 1) + 0.5))], 3)
