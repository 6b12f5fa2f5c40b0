"""Prometheus metrics of the server (`GET /metrics`), in a registry of its own.

Requests, tokens and latencies are counted where the request ends; the guard's pauses, checks,
blocks and fail-closed events as the engine thread hands them out (`observe`). Time to first
token is the time to the first *shown* text (a guard may hold the first tokens), and the
inter-token latency is the gap between pieces of text shown to the client.
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, generate_latest
from prometheus_client import CONTENT_TYPE_LATEST

from oc_engine.outputs import Finished, Paused, Refused, TextReleased, VerdictReceived
from oc_engine.server.responses import finish_reason

LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST
LOOP_PROBE_S = 0.1


class ServerMetrics:
    def __init__(self, model_name: str):
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        label = {"labelnames": ("model_name",)}
        self.model_name = model_name
        self.requests = Counter("oc_engine_requests", "Requests by outcome: stop, length, content_filter, "
                                "cancelled, or the HTTP error status", ("model_name", "outcome"), registry=registry)
        self.prompt_tokens = Counter("oc_engine_prompt_tokens", "Prompt tokens of served requests",
                                     registry=registry, **label)
        self.generation_tokens = Counter("oc_engine_generation_tokens", "Tokens generated (shown or held back)",
                                         registry=registry, **label)
        self.ttft = Histogram("oc_engine_time_to_first_token_seconds", "Arrival to the first text shown",
                              buckets=LATENCY_BUCKETS, registry=registry, **label)
        self.itl = Histogram("oc_engine_inter_token_latency_seconds", "Gap between pieces of text shown",
                             buckets=LATENCY_BUCKETS, registry=registry, **label)
        self.e2e = Histogram("oc_engine_request_latency_seconds", "Arrival to the finish",
                             buckets=LATENCY_BUCKETS, registry=registry, **label)
        self.running = Gauge("oc_engine_requests_running", "Requests holding a cache slot",
                             registry=registry, **label)
        self.waiting = Gauge("oc_engine_requests_waiting", "Requests accepted, waiting for a slot",
                             registry=registry, **label)
        self.pauses = Counter("oc_engine_guard_pauses", "Pause points: the probe held the answer",
                              registry=registry, **label)
        self.checks = Counter("oc_engine_guard_checks", "Classifier verdicts by kind (allow, block, uncertain, "
                              "error, timeout)", ("model_name", "verdict"), registry=registry)
        self.blocks = Counter("oc_engine_guard_blocks", "Answers replaced by the refusal", registry=registry,
                              **label)
        self.fail_closed = Counter("oc_engine_guard_fail_closed", "Checks that failed (error or missed deadline); "
                                   "nothing they covered was shown", ("model_name", "reason"), registry=registry)
        self.classifier_latency = Histogram("oc_engine_classifier_latency_seconds", "Check submission to verdict",
                                            buckets=LATENCY_BUCKETS, registry=registry, **label)
        self.loop_lag = Histogram("oc_engine_event_loop_lag_seconds", "How late the event loop woke a timer "
                                  f"set every {LOOP_PROBE_S} s: time it spent on other work (streams, "
                                  "parsing) before it could answer", buckets=LATENCY_BUCKETS,
                                  registry=registry, **label)
        self._last_text: dict[str, float] = {}  # request id -> when its last text was shown

    async def watch_loop(self) -> None:
        """Sample the event loop's lag forever (a task of the server's lifespan)."""
        import asyncio

        loop, lag = asyncio.get_running_loop(), self.loop_lag.labels(self.model_name)
        while True:
            due = loop.time() + LOOP_PROBE_S
            await asyncio.sleep(LOOP_PROBE_S)
            lag.observe(max(0.0, loop.time() - due))

    def track(self, engine) -> None:
        """Read the running and waiting gauges from this `AsyncEngine` at scrape time."""
        self.running.labels(self.model_name).set_function(lambda: engine.running)
        self.waiting.labels(self.model_name).set_function(lambda: engine.waiting)

    def observe(self, seq, events: list) -> None:
        """An `AsyncEngine` observer: called on the engine thread with one request's events."""
        m, now = self.model_name, time.perf_counter()
        for event in events:
            if isinstance(event, TextReleased) and event.text:
                last = self._last_text.get(event.request_id)
                if last is not None:
                    self.itl.labels(m).observe(now - last)
                self._last_text[event.request_id] = now
            elif isinstance(event, Paused):
                self.pauses.labels(m).inc()
            elif isinstance(event, VerdictReceived):
                verdict = event.verdict
                self.checks.labels(m, verdict.verdict).inc()
                if verdict.latency_ms is not None:
                    self.classifier_latency.labels(m).observe(verdict.latency_ms / 1000)
                if verdict.verdict in ("error", "timeout"):
                    self.fail_closed.labels(m, verdict.verdict).inc()
            elif isinstance(event, Refused):
                self.blocks.labels(m).inc()
            elif isinstance(event, Finished):
                self._last_text.pop(event.request_id, None)
                self.finished(event.completion)

    def finished(self, completion) -> None:
        m, timings = self.model_name, completion.timings
        self.requests.labels(m, finish_reason(completion)).inc()
        self.prompt_tokens.labels(m).inc(len(completion.prompt_token_ids))
        self.generation_tokens.labels(m).inc(completion.generated_tokens)
        if timings.first_text_ms is not None:
            self.ttft.labels(m).observe(timings.first_text_ms / 1000)
        self.e2e.labels(m).observe(timings.total_ms / 1000)

    def rejected(self, status: int) -> None:
        self.requests.labels(self.model_name, str(status)).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
