"""pytest-benchmark: 128 fixed-length new tokens at batch 1 on the embedded model, one dtype for all.

    uv run pytest bench --benchmark-enable --bench-dtype bfloat16

`oc-engine bench` measures the same modes with time-to-first-token and writes JSON.
"""

import pytest
import torch

from oc_engine.bench.decode import MODES, mode_runner

NEW_TOKENS = 128


@pytest.mark.parametrize("mode", [*MODES, "engine_compiled_probe"])
def test_decode_128_tokens(benchmark, embedded, mode):
    loaded, prompt = embedded
    run = mode_runner(mode, loaded, prompt)
    with torch.inference_mode():
        run(NEW_TOKENS)  # warm-up, compilation included
        tokens = benchmark.pedantic(run, args=(NEW_TOKENS,), rounds=3, iterations=1)
    assert len(tokens) == NEW_TOKENS
    benchmark.extra_info["tokens_per_s_end_to_end"] = NEW_TOKENS / benchmark.stats.stats.median
