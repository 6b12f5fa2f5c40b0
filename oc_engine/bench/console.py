"""`oc-engine bench console`: how fast the guard console paints, and whether its live trace
keeps up, in headless Chromium against a started, warm `oc-engine serve --guard-details`.

First paint: the page loaded `loads` times with the browser's cache cleared each time; the
browser's own first-contentful-paint and the moment the page is ready to chat (its settings
fetched), both from the start of navigation. Trace: a stream of `tokens` tokens (a score chunk
and a text chunk each, as the server sends them) replayed in the page at `rate` tokens/s
through the page's own stream reader and drawing, then as fast as the page takes them; for each
token, the lag from its chunk's arrival to the end of the drawing that shows it. The page
keeps up when the replay ends on time and that lag stays within a few frames.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path
from typing import Callable

from oc_engine.bench.stats import quantile

# In the page: replay `tokens` tokens at `rate` tokens/s (0: as fast as it takes them) through
# its stream reader into a new answer, timing each token's arrival and the drawing that shows it.
REPLAY_JS = """
const [tokens, rate, done] = arguments;
(async () => {
  const { Answer, readEvents, handleChunk, state } = window.ocConsole;
  const settings = Object.assign({}, state.settings, { guard_details: true,
    thresholds: state.settings.thresholds || { warn: 0.5, pause: 0.8 } });
  const answer = new Answer(settings);
  document.getElementById("messages").append(answer.root);
  const trace = answer.trace, arrived = new Float64Array(tokens), drawn = new Float64Array(tokens);
  const add = trace.add.bind(trace), draw = trace.draw.bind(trace), drawMs = [];
  let shown = 0;
  trace.add = (i, score, ema) => { arrived[i] = performance.now(); add(i, score, ema); };
  trace.draw = () => {
    const t0 = performance.now();
    draw();
    const t1 = performance.now();
    drawMs.push(t1 - t0);
    for (; shown < trace.points.length; shown++) drawn[shown] = t1;
  };
  const encoder = new TextEncoder();
  const sse = (obj) => encoder.encode(`data: ${JSON.stringify(obj)}\\n\\n`);
  const base = { id: "chatcmpl-replay", object: "chat.completion.chunk", created: 0, model: settings.model };
  let ema = 0;
  const chunks = (i) => {
    const score = (Math.sin(i / 17) + 1) / 2;
    ema = 0.3 * score + 0.7 * ema;
    return [Object.assign({ choices: [], oc_engine: { event: "score", token_index: i, score, ema } }, base),
            Object.assign({ choices: [{ index: 0, delta: { content: " word" }, logprobs: null, finish_reason: null }] }, base)];
  };
  const started = performance.now();
  const body = new ReadableStream({ start(controller) {
    let i = 0;
    const pump = () => {
      const due = rate ? Math.min(tokens, Math.floor((performance.now() - started) * rate / 1000) + 1)
                       : Math.min(tokens, i + 64);
      for (; i < due; i++) for (const chunk of chunks(i)) controller.enqueue(sse(chunk));
      if (i < tokens) { setTimeout(pump, rate ? 1000 / rate : 0); return; }
      controller.enqueue(sse(Object.assign({ choices: [{ index: 0, delta: {}, logprobs: null, finish_reason: "length" }],
        oc_engine: { guarded: true, status: "completed", refusal: null, released_tokens: tokens } }, base)));
      controller.enqueue(encoder.encode("data: [DONE]\\n\\n"));
      controller.close();
    };
    pump();
  } });
  await readEvents(new Response(body), (chunk) => handleChunk(answer, chunk));
  const read = performance.now();
  while (shown < tokens) await new Promise((r) => requestAnimationFrame(r));
  const lags = Array.from(drawn, (t, i) => t - arrived[i]);
  answer.root.remove();
  return { wall_ms: performance.now() - started, read_ms: read - started, lags, draw_ms: drawMs,
           points: trace.points.length };
})().then(done, (error) => done({ error: String(error) }));
"""


def run_console_bench(*, loads: int = 10, tokens: int = 1000, rate: float = 100.0, dtype: str = "float32",
                      log_dir: Path, progress: Callable[[str], None] = lambda s: None) -> dict:
    import httpx
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from oc_engine.bench.browser import chromium
    from oc_engine.bench.serve import free_port, start_server, stop_server, wait_healthy

    port = free_port()
    base = f"http://127.0.0.1:{port}"
    settings = {"loads": loads, "tokens": tokens, "rate": rate, "dtype": dtype,
                "server": "serve --guard-details --no-compile (the page does not depend on decoding speed)"}
    command = [sys.executable, "-m", "oc_engine.cli", "serve", "--port", str(port), "--dtype", dtype, "--no-compile",
               "--guard-details", "--log-level", "warning"]
    log = log_dir / "server.log"
    progress(f"starting the server (log {log})")
    proc = start_server(command, log)
    try:
        wait_healthy(base, proc, log)
        httpx.get(f"{base}/", timeout=10).raise_for_status()  # warm: the page's files were read once
        with chromium() as driver:
            driver.set_script_timeout(600)
            loaded = []
            for i in range(loads):
                driver.get("about:blank")
                driver.execute_cdp_cmd("Network.clearBrowserCache", {})
                driver.get(f"{base}/")
                WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text == "ready")
                loaded.append(driver.execute_script(
                    "return {fcp: performance.getEntriesByName('first-contentful-paint')[0].startTime, "
                    "ready: window.ocConsole.state.readyAt}"))
                progress(f"load {i + 1}/{loads}: first paint {loaded[-1]['fcp']:.0f} ms")
            replays = []
            for replay_rate in (rate, 0.0):
                progress(f"replaying {tokens} tokens at " + (f"{replay_rate:g} tokens/s" if replay_rate
                                                               else "the page's own pace"))
                result = driver.execute_async_script(REPLAY_JS, tokens, replay_rate)
                if "error" in result:
                    raise RuntimeError(f"the replay failed in the page: {result['error']}")
                replays.append(_replay_summary(result, tokens, replay_rate))
            browser_version = driver.capabilities.get("browserVersion")
    finally:
        stop_server(proc)
    fcp, ready = [r["fcp"] for r in loaded], [r["ready"] for r in loaded]
    paced, burst = replays
    return {"bench": "console", "date": time.strftime("%Y-%m-%d"), "settings": settings,
            "browser": f"Chromium {browser_version} (headless)",
            "first_paint_ms": _spread(fcp), "ready_ms": _spread(ready), "replay": replays,
            "targets": {"first_paint_under_1s": {"value": max(fcp), "met": max(fcp) < 1000},
                        "trace_keeps_up_at_rate": {"value": paced["lag_ms"]["p99"],
                                                   "met": paced["on_time"] and paced["lag_ms"]["p99"] <= 50}}}


def _replay_summary(result: dict, tokens: int, rate: float) -> dict:
    lags, wall_s = sorted(result["lags"]), result["wall_ms"] / 1000
    out = {"rate": rate or None, "tokens": tokens, "points": result["points"], "wall_s": round(wall_s, 3),
           "tokens_per_s": round(tokens / wall_s, 1), "draws": len(result["draw_ms"]),
           "lag_ms": {"p50": round(quantile(lags, 0.5), 1), "p99": round(quantile(lags, 0.99), 1),
                      "max": round(lags[-1], 1)},
           "draw_ms": _spread(result["draw_ms"])}
    if rate:  # on time: the last token drawn within 5% (or 100 ms) of when the stream sent it
        out["on_time"] = wall_s <= tokens / rate * 1.05 + 0.1
    return out


def _spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 1), "p99": round(quantile(values, 0.99), 1),
            "max": round(max(values), 1)}


def console_markdown_table(report: dict) -> str:
    fcp, ready = report["first_paint_ms"], report["ready_ms"]
    lines = [f"{report['browser']}, {report['settings']['loads']} cold-cache loads of a warm server:",
             "", "| | median | p99 | max |", "|---|---:|---:|---:|",
             f"| first contentful paint (ms) | {fcp['median']} | {fcp['p99']} | {fcp['max']} |",
             f"| ready to chat (ms) | {ready['median']} | {ready['p99']} | {ready['max']} |", "",
             "| trace replay | tokens | wall s | tokens/s | draws | lag p50 ms | lag p99 ms | lag max ms | draw p99 ms |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in report["replay"]:
        name = f"at {r['rate']:g} tokens/s" if r["rate"] else "as fast as the page takes it"
        lines.append(f"| {name} | {r['tokens']} | {r['wall_s']} | {r['tokens_per_s']} | {r['draws']} | "
                     f"{r['lag_ms']['p50']} | {r['lag_ms']['p99']} | {r['lag_ms']['max']} | {r['draw_ms']['p99']} |")
    return "\n".join(lines)
