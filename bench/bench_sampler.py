"""Decode speed with sampling: the per-sequence counter-based sampler against torch's shared
`exponential_` generator (the sampler before 2026-11-30), on the embedded model, compiled.

    uv run python bench/bench_sampler.py keyed
    uv run python bench/bench_sampler.py shared

Prints the median decode rate of 7 runs of 128 tokens (EOS ignored) after a warm-up run.
Run the two modes alternately, twice each: this machine's speed drifts between runs.
"""

import statistics
import sys

import torch

import oc_engine.engine.model_runner as model_runner
from oc_engine.config import UNGUARDED, EngineConfig
from oc_engine.engine.prompts import render_prompt
from oc_engine.llm import LLM
from oc_engine.models.loading import load_model
from oc_engine.params import SamplingParams


def shared_stream_sample(logits, rows, keys=None, positions=None):
    """The earlier sampler (temperature only): one draw per token from torch's generator."""
    probs = (logits / rows.temperature[:, None]).softmax(dim=-1)
    return (probs / torch.empty_like(probs).exponential_(1)).argmax(dim=-1)


def main(mode: str) -> None:
    if mode not in ("keyed", "shared"):
        raise SystemExit("usage: bench_sampler.py keyed|shared")
    if mode == "shared":
        model_runner.sample_rows = shared_stream_sample
    loaded = load_model(None, dtype="bfloat16", progress=False)
    prompt = render_prompt(loaded.tokenizer, "Write a story about a lighthouse keeper.")
    params = SamplingParams(max_tokens=128, ignore_eos=True, seed=1, temperature=0.8)
    llm = LLM(loaded, EngineConfig(max_num_seqs=1), UNGUARDED)
    llm.fit([prompt], params)
    llm.generate([prompt], params)  # warm-up: compilation
    rates = [llm.generate([prompt], params)[0].timings.decode_tokens_per_s for _ in range(7)]
    print(f"{mode}: median {statistics.median(rates):.1f} tokens/s; runs {[round(r, 1) for r in rates]}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "keyed")
