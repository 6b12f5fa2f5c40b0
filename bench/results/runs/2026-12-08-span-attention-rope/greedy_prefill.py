"""Prefill of one prompt (eager), greedy: argmax (shipped) vs the sort-based sampler (before).

    uv run python bench/results/runs/2026-12-08-span-attention-rope/greedy_prefill.py

Eager, so both variants run in one process, in turns (10 each; medians, ms). The "before"
variant is a SamplingConfig whose `greedy` says False: the prefill then runs the sampler,
whose temperature-0 rows pick the same argmax after sorting the vocabulary."""
import time, torch, statistics, json
from oc_engine import LLM
from oc_engine.config import EngineConfig, UNGUARDED
from oc_engine.params import SamplingConfig
from oc_engine.engine.prompts import render_prompt
from oc_engine.bench.decode import BENCH_PROMPT

class Before(SamplingConfig):
    @property
    def greedy(self):  # the sampler runs, as before (temperature 0 rows still pick the argmax)
        return False

llm = LLM(config=EngineConfig(dtype="bfloat16", max_num_seqs=16, compile=False), guard=UNGUARDED)
runner = llm.engine.runner
ids = render_prompt(llm.tokenizer, BENCH_PROMPT)
res = {"before": [], "shipped": []}
with torch.inference_mode():
    tokens = {name: runner.prefill(3, ids, cfg, 0)[0] for name, cfg in (("before", Before()), ("shipped", SamplingConfig()))}
    assert tokens["before"] == tokens["shipped"], tokens
    for _ in range(10):
        for name, cfg in (("before", Before()), ("shipped", SamplingConfig())):
            start = time.perf_counter(); runner.prefill(3, ids, cfg, 0); res[name].append((time.perf_counter() - start) * 1e3)
print(json.dumps({"prompt_tokens": len(ids), **{k: round(statistics.median(v), 2) for k, v in res.items()}}))
