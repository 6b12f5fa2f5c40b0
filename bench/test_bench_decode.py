"""pytest-benchmark: 128 fixed-length new tokens at batch 1 on the embedded model, one dtype for all.

    uv run pytest bench --benchmark-enable --bench-dtype bfloat16

`oc-engine bench` measures the same modes with time-to-first-token and writes JSON.
"""

import pytest
import torch

from oc_engine.bench import MODES

NEW_TOKENS = 128


@pytest.mark.parametrize("mode", MODES)
def test_decode_128_tokens(benchmark, embedded, mode):
    loaded, prompt = embedded
    from oc_engine import bench as b

    runs = {"hf_generate": b._hf_generate, "no_kv_cache": b._no_kv_cache,
            "engine_eager": lambda lm, p: b._engine(lm, p, compile=False),
            "engine_compiled": lambda lm, p: b._engine(lm, p, compile=True)}
    run = runs[mode](loaded, prompt)
    with torch.inference_mode():
        run(NEW_TOKENS)  # warm-up, compilation included
        tokens = benchmark.pedantic(run, args=(NEW_TOKENS,), rounds=3, iterations=1)
    assert len(tokens) == NEW_TOKENS
    benchmark.extra_info["tokens_per_s_end_to_end"] = NEW_TOKENS / benchmark.stats.stats.median
