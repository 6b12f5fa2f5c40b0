"""Escalation benchmark: what the guard costs when the probe really pauses.

Four modes on one prompt, the same compiled engine, N new tokens (EOS ignored), batch 1:
- unguarded: no probe;
- probe_only: the probe scored inside the step, thresholds it never reaches;
- escalating: the pause threshold set to a high quantile of this answer's own EMA (from the
  probe-only run), so the answer pauses several times; the classifier runs in its worker
  thread while decoding goes on, and its verdicts are forced to allow, so every answer
  runs to its end and every pause costs real checks (after an allow, the tokens made
  meanwhile are judged again by their probe flags, and each check covers the answer up to its
  pause point);
- blocking: the same pauses, but decoding stops for each check (the original MVP's design:
  stop, classify, resume).

Every token's arrival (the engine handing it to the monitor) is timestamped. tokens/s is
(N - 1) / (t_N - t_1); a gap is the time between two arrivals; a gap "during a check" is one
that overlaps the interval between a check's submission and its verdict. The modes run
round-robin (each round runs every mode once). Each mode reports its median run (by tokens/s),
its speed against unguarded as the median over rounds of the ratio to that round's unguarded
run, the largest gap during a check over all runs, and the largest ratio of a run's largest gap
during a check to that run's median gap.
"""

from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import statistics
import time
from datetime import datetime, timezone
from typing import Callable

import onnxruntime
import torch

from oc_engine.bench.decode import BENCH_PROMPT, bench_llm, check_bench_length, package_version, quiet_probe
from oc_engine.engine.prompts import render_prompt
from oc_engine.guard.policy import GuardConfig
from oc_engine.models.loading import LoadedModel
from oc_engine.params import SamplingParams

GUARD_BENCH_MODES = ("unguarded", "probe_only", "escalating", "blocking")
GUARDED_MODES = ("escalating", "blocking")


class TimedClassifier:
    """Wraps a classifier: records each check's [submitted, answered] interval, forces allow.

    blocking=True waits for the verdict inside `submit`, so the decode loop stalls for it.
    """

    def __init__(self, inner, blocking: bool, clock: Callable[[], float] = time.perf_counter):
        self.inner, self.blocking, self.clock = inner, blocking, clock
        self.reads_states = getattr(inner, "reads_states", False)  # a state reader gets the states it reads
        self.intervals: list[tuple[float, float]] = []

    def submit(self, prompt: str, response: str, urgent: bool = False, judged_chars: int = 0,
               **states) -> cf.Future:
        start = self.clock()
        future = self.inner.submit(prompt, response, urgent=urgent or self.blocking, judged_chars=judged_chars,
                                   **states)
        future.add_done_callback(lambda _: self.intervals.append((start, self.clock())))
        if self.blocking:
            self.drain()  # an inline classifier answers when asked
            cf.wait([future])
        return future

    def drain(self) -> None:
        """Pass the decode loop's call on to an inline classifier."""
        drain = getattr(self.inner, "drain", None)
        if drain is not None:
            drain()


def gap_stats(arrivals: list[float], checks: list[tuple[float, float]]) -> dict:
    """Inter-token gaps (ms): median, max, and max of the gaps overlapping a check."""
    gaps = [(b - a, a, b) for a, b in zip(arrivals, arrivals[1:])]
    during = [g for g, a, b in gaps if any(s < b and e > a for s, e in checks)]
    return {"median_gap_ms": statistics.median(g for g, _, _ in gaps) * 1000,
            "max_gap_ms": max(g for g, _, _ in gaps) * 1000,
            "max_gap_during_check_ms": max(during) * 1000 if during else None,
            "gaps_during_checks": len(during)}


def escalating_probe(loaded: LoadedModel, llm, prompt: list[int], new_tokens: int, quantile: float,
                     layers: tuple[int, ...] = (-4,)):
    """The quiet probe with bias 0 and its pause threshold at `quantile` of this answer's EMA."""
    from oc_engine.guard.probe import Probe

    base = quiet_probe(loaded, layers)
    scoring = Probe(config=dataclasses.replace(base.config, warn=1.0, pause=1.0), weight=base.weight,
                    bias=torch.zeros(1))
    llm.set_probe(scoring)
    emas = llm.run([prompt], SamplingParams(max_tokens=new_tokens, ignore_eos=True))[0].emas
    threshold = statistics.quantiles(emas, n=100)[int(quantile * 100) - 1]
    config = dataclasses.replace(base.config, warn=threshold, pause=threshold)
    return Probe(config=config, weight=base.weight, bias=torch.zeros(1))


def run_guard_bench(loaded: LoadedModel, classifier, *, new_tokens: int = 128, repeats: int = 3,
                    quantile: float = 0.9, max_held: int = GuardConfig.max_held,
                    progress: Callable[[str], None] | None = None) -> dict:
    """Benchmark the modes; returns a JSON-ready report. `classifier`: an ExchangeClassifier or a
    StateReader (the probe then taps the layers it reads)."""
    prompt = render_prompt(loaded.tokenizer, BENCH_PROMPT)
    check_bench_length(loaded, len(prompt), new_tokens)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    layers = classifier.config.layers if getattr(classifier, "reads_states", False) else (-4,)
    quiet = quiet_probe(loaded, layers)
    plain = bench_llm(loaded, prompt, new_tokens)
    probed = bench_llm(loaded, prompt, new_tokens, probe=quiet, guard=GuardConfig(max_held=max_held))
    escalating = escalating_probe(loaded, probed, prompt, new_tokens, quantile, layers)
    forced = dataclasses.replace(classifier.config, allow_threshold=1.0, block_threshold=1.0)
    classifier.config = forced  # every verdict is allow: the answer runs to its end

    def run(mode: str) -> dict:
        llm, timed = (plain if mode == "unguarded" else probed), None
        if mode in GUARDED_MODES:
            timed = TimedClassifier(classifier, blocking=mode == "blocking")
            probed.set_probe(escalating)
            probed.classifier = timed
        elif mode == "probe_only":
            probed.set_probe(quiet)
            probed.classifier = None
        # Each token's arrival: when the engine handed it to the guard (or, unguarded, released it).
        seq = llm.run([prompt], params)[0]
        arrivals = seq.token_times
        row = {"tokens_per_s": (len(arrivals) - 1) / (arrivals[-1] - arrivals[0]),
               **gap_stats(arrivals, timed.intervals if timed else [])}
        if timed is not None:
            guard = seq.completion.guard
            row.update(pauses=len(guard.pause_points), checks=len(guard.verdicts),
                       check_ms=statistics.median(v.latency_ms for v in guard.verdicts) if guard.verdicts else None,
                       status=guard.status)
        return row

    runs: dict[str, list[dict]] = {mode: [] for mode in GUARD_BENCH_MODES}
    with torch.inference_mode():
        for mode in GUARD_BENCH_MODES:
            if progress:
                progress(f"{mode} (warm-up)")
            run(mode)
        # Round-robin: every round runs each mode once, so a slow spell of the machine hits
        # all modes alike, and each mode is compared with the unguarded run of its own round.
        for round_ in range(repeats):
            if progress:
                progress(f"round {round_ + 1}/{repeats}")
            for mode in GUARD_BENCH_MODES:
                runs[mode].append(run(mode))
    rows = []
    for mode in GUARD_BENCH_MODES:
        best = sorted(runs[mode], key=lambda r: r["tokens_per_s"])[repeats // 2]  # the median run
        paired = [r["tokens_per_s"] / u["tokens_per_s"] for r, u in zip(runs[mode], runs["unguarded"])]
        # The worst run for gaps: each run's largest gap during a check against its own median.
        ratios = [r["max_gap_during_check_ms"] / r["median_gap_ms"] for r in runs[mode] if r["max_gap_during_check_ms"]]
        rows.append({"mode": mode, **best, "ratio_to_unguarded": statistics.median(paired),
                     "max_gap_during_check_ms": max((r["max_gap_during_check_ms"] or 0) for r in runs[mode]) or None,
                     "max_check_gap_over_median": max(ratios) if ratios else None})
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": loaded.source,
            "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": package_version("transformers"), "onnxruntime": onnxruntime.__version__,
            "classifier": str(classifier.path), "classifier_backend": classifier.backend,
            "pause_quantile": quantile, "pause_threshold": escalating.config.pause, "max_held": max_held,
            "batch": 1, "prompt_tokens": len(prompt), "new_tokens": new_tokens, "repeats": repeats, "results": rows}


def guard_markdown_table(report: dict) -> str:
    lines = [f"{report['model'].rsplit('/', 1)[-1]}, {report['dtype']}, {report['device']} "
             f"({report['threads']} threads), batch 1, {report['new_tokens']} new tokens, classifier "
             f"{report['classifier'].rstrip('/').rsplit('/', 1)[-1]} ({report['classifier_backend']}), pause at EMA >= "
             f"{report['pause_threshold']:.3f} (the {report['pause_quantile']:.0%} quantile), "
             f"torch {report['torch']}, {report['date'][:10]}",
             "",
             "| mode | tokens/s | x unguarded | median gap (ms) | max gap (ms) | max gap during a check (ms) "
             "| worst run: that / its median | pauses | checks | check latency (ms, median) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def fmt(value, spec):
        return "" if value is None else format(value, spec)
    for r in report["results"]:
        lines.append(f"| {r['mode']} | {r['tokens_per_s']:.1f} | {r['ratio_to_unguarded']:.3f} "
                     f"| {r['median_gap_ms']:.1f} | {r['max_gap_ms']:.1f} | {fmt(r['max_gap_during_check_ms'], '.1f')} "
                     f"| {fmt(r['max_check_gap_over_median'], '.2f')} | {r.get('pauses', '')} | {r.get('checks', '')} "
                     f"| {fmt(r.get('check_ms'), '.1f')} |")
    return "\n".join(lines)
