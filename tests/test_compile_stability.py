"""After warm-up the compiled step never recompiles, and the full graph has no breaks."""

import pytest
import torch

from oc_engine.engine.decode import Engine, GenerationConfig
from oc_engine.engine.sampling import SamplingConfig

PROMPT = [2, 17, 99, 45, 300, 12, 7, 8, 9, 10, 11, 13, 200, 201]


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_no_recompile_after_warmup(tiny, family):
    # fullgraph=True already turns any graph break into an error; this checks recompiles.
    torch._dynamo.reset()
    engine = Engine(tiny(family), compile=True, tap=-2)
    sampling = SamplingConfig(temperature=0.9, top_k=50, top_p=0.9)
    engine.generate([PROMPT], GenerationConfig(max_new_tokens=2, sampling=sampling, seed=0))  # one compiled step
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        for prompt in (PROMPT, PROMPT[:5], PROMPT + [5, 6, 7]):  # other lengths, same cache bucket
            results = engine.generate([prompt], GenerationConfig(max_new_tokens=20, ignore_eos=True,
                                                                 sampling=sampling, seed=1))
            assert len(results[0].token_ids) == 20
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before
