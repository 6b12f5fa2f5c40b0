"""What the input check costs in time to first shown token.

One compiled engine, batch 1, streamed answers (so no final check), a probe that never pauses
(so the only check is the input check), and the real classifier. Modes run round-robin over a
few benign prompts: `off`, and `input_check` (the prompt judged alone while it is prefilled;
tokens held until the verdict). Reported per mode: median time to the first token made
(`ttft_ms`) and to the first text shown (`first_text_ms`), and the input check's latency; the
cost is the median over (round, prompt) pairs of the difference in first text shown.
"""

from __future__ import annotations

import statistics
from datetime import datetime, timezone

import onnxruntime
import torch

from oc_engine.bench.decode import package_version, quiet_probe
from oc_engine.guard.policy import GuardConfig
from oc_engine.models.loading import LoadedModel
from oc_engine.params import SamplingParams

PROMPTS = ("Explain SQL injection at a high level", "Write a haiku about autumn rain",
           "How do I kill a frozen process on Linux?", "What are three tips for a job interview?")
MODES = ("off", "input_check")


def run_input_check_bench(loaded: LoadedModel, classifier, *, rounds: int = 5, new_tokens: int = 8,
                          progress=None) -> dict:
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM
    from oc_engine.outputs import Finished

    llm = LLM(loaded, EngineConfig(max_num_seqs=1),
              GuardSetup(probe=quiet_probe(loaded), classifier=classifier, policy=GuardConfig()))
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    llm.fit(list(PROMPTS), params)
    configs = {"off": GuardConfig(input_check=False), "input_check": GuardConfig(input_check=True)}

    def once(mode: str, prompt: str):
        llm.guard_config = configs[mode]
        finished = [e for e in llm.stream(prompt, params) if isinstance(e, Finished)]
        return finished[0].completion

    for prompt in PROMPTS:  # warm-up: compile, and the classifier's first sessions
        for mode in MODES:
            once(mode, prompt)
    runs = {mode: [] for mode in MODES}
    for r in range(rounds):
        if progress:
            progress(f"round {r + 1}/{rounds}")
        for prompt in PROMPTS:
            for mode in MODES:
                c = once(mode, prompt)
                checks = [v.latency_ms for v in c.guard.verdicts if v.input]
                runs[mode].append({"prompt": prompt, "ttft_ms": c.timings.ttft_ms,
                                   "first_text_ms": c.timings.first_text_ms, "status": c.guard.status,
                                   "input_check_ms": checks[0] if checks else None})
    llm.close()
    rows = []
    for mode in MODES:
        done = runs[mode]
        latencies = [r["input_check_ms"] for r in done if r["input_check_ms"] is not None]
        rows.append({"mode": mode, "runs": len(done),
                     "ttft_ms": statistics.median(r["ttft_ms"] for r in done),
                     "first_text_ms": statistics.median(r["first_text_ms"] for r in done if r["first_text_ms"]),
                     "input_check_ms": statistics.median(latencies) if latencies else None,
                     "blocked": sum(r["status"] == "blocked" for r in done)})
    cost = statistics.median(b["first_text_ms"] - a["first_text_ms"]
                             for a, b in zip(runs["off"], runs["input_check"])
                             if a["first_text_ms"] and b["first_text_ms"])
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "model": loaded.source,
            "dtype": str(loaded.dtype).removeprefix("torch."), "device": str(loaded.device),
            "threads": torch.get_num_threads(), "torch": torch.__version__,
            "transformers": package_version("transformers"), "onnxruntime": onnxruntime.__version__,
            "classifier": str(classifier.path), "classifier_backend": classifier.backend, "batch": 1,
            "new_tokens": new_tokens, "rounds": rounds, "prompts": list(PROMPTS),
            "input_check_cost_ms": cost, "results": rows, "runs": runs}


def input_check_markdown_table(report: dict) -> str:
    lines = [f"{report['model'].rsplit('/', 1)[-1]}, {report['dtype']}, {report['device']} "
             f"({report['threads']} threads), batch 1, streamed, {len(report['prompts'])} prompts x "
             f"{report['rounds']} rounds, classifier {report['classifier_backend']}, {report['date'][:10]}", "",
             "| mode | time to first token made (ms, median) | to first text shown (ms, median) | "
             "input check (ms, median) | blocked |", "|---|---:|---:|---:|---:|"]
    for r in report["results"]:
        check = "" if r["input_check_ms"] is None else f"{r['input_check_ms']:.1f}"
        lines.append(f"| {r['mode']} | {r['ttft_ms']:.1f} | {r['first_text_ms']:.1f} | {check} | {r['blocked']} |")
    lines += ["", f"cost of the input check in time to first text shown: {report['input_check_cost_ms']:+.1f} ms "
                  "(median over paired runs)"]
    return "\n".join(lines)


