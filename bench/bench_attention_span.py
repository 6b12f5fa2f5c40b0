"""Decode speed in a long cache: attention bounded by the live span against attention over the
whole cache (the engine before 2026-11-30), on the embedded model, compiled, bf16.

    uv run python bench/bench_attention_span.py span 16 2048
    uv run python bench/bench_attention_span.py whole 16 2048

Arguments: mode, slots (all busy), cache length. Prints the decode rate of 128 tokens per slot
(EOS ignored, short prompts) after a warm-up run; `whole` restores the fixed-length attention
with its matmuls; `span` bounds it in caches over SPAN_MIN_CACHE, `span-always` in any cache
(to see why short caches keep the fixed-length attention). Run the modes alternately: this
machine's speed drifts between runs.
"""

import sys
import time

import torch

import oc_engine.engine.model_runner as model_runner
from oc_engine.config import UNGUARDED, EngineConfig
from oc_engine.llm import LLM
from oc_engine.params import SamplingParams


def main(mode: str, slots: int, cache: int) -> None:
    if mode not in ("span", "span-always", "whole"):
        raise SystemExit("mode: span, span-always or whole")
    if mode == "whole":
        model_runner.ModelRunner._span_ref = lambda self: None
    if mode == "span-always":
        model_runner.SPAN_MIN_CACHE = 0
    llm = LLM(None, EngineConfig(dtype="bfloat16", max_num_seqs=slots, max_model_len=cache), UNGUARDED)
    params = SamplingParams(max_tokens=128, ignore_eos=True)
    llm.generate(["Hello"] * slots, params)  # warm-up: compiles
    start = time.perf_counter()
    llm.generate(["Explain DNS."] * slots, params)
    elapsed = time.perf_counter() - start
    print(f"{mode}: {slots} slots, cache {cache}: {slots * 128 / elapsed:.1f} tokens/s "
          f"(span attention {'on' if llm.runner.span_attention and mode != 'whole' else 'off'}, "
          f"torch {torch.__version__})")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
