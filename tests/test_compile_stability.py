"""After warm-up the compiled step never recompiles, and the full graph has no breaks:
not for other prompt lengths, nor for requests joining and leaving, nor for other sampling
parameters (they are per-slot tensors)."""

import pytest
import torch

from probe_helpers import fixed, plain_llm

PROMPT = [2, 17, 99, 45, 300, 12, 7, 8, 9, 10, 11, 13, 200, 201]


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_no_recompile_after_warmup(tiny, family):
    # fullgraph=True already turns any graph break into an error; this checks recompiles.
    torch._dynamo.reset()
    llm = plain_llm(tiny(family), compile=True, max_num_seqs=3, tap=-2)
    llm.generate([PROMPT, PROMPT[:6]], [fixed(2), fixed(2, temperature=0.9, top_k=50, top_p=0.9, seed=0)])  # warm-up
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    finished = {}

    def step(times=1):
        for _ in range(times):
            finished.update((e.request_id, e.completion) for e in llm.step() if type(e).__name__ == "Finished")

    with torch._dynamo.config.patch(error_on_recompile=True):
        first = llm.add_request(PROMPT, fixed(20, temperature=0.7, seed=1))
        step(3)
        short = llm.add_request(PROMPT[:5], fixed(4))  # joins while the first decodes, leaves early
        step(6)
        last = llm.add_request(PROMPT + [5, 6, 7], fixed(12, top_k=3, temperature=1.2, seed=2))  # a freed slot
        assert llm.cancel(first)
        while llm.has_unfinished():
            step()
    assert [finished[r].finish_reason for r in (first, short, last)] == ["cancelled", "length", "length"]
    assert [len(finished[r].token_ids) for r in (short, last)] == [4, 12]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before


def test_a_long_cache_bounds_attention_by_the_live_span_without_recompiling(tiny, monkeypatch):
    """In a cache longer than SPAN_MIN_CACHE, attention reads only the live span; the span is a
    symbol of one graph, so answers that cross span buckets neither recompile nor change tokens."""
    import torch._dynamo

    import oc_engine.engine.model_runner as model_runner
    from conftest import hf_greedy
    from oc_engine.engine.model_runner import SPAN_BUCKET
    from probe_helpers import fixed, plain_llm

    monkeypatch.setattr(model_runner, "SPAN_MIN_CACHE", SPAN_BUCKET)  # the tiny model's context is 256
    loaded = tiny("llama")
    llm = plain_llm(loaded, compile=True, max_num_seqs=2, max_model_len=2 * SPAN_BUCKET)
    # Under torch 2.11 (the GPU image's) the compiled step attends over the whole cache instead.
    assert llm.runner.span_attention == model_runner.SPAN_COMPILES
    prompt = [2] + [5 + i % 50 for i in range(SPAN_BUCKET - 8)]  # its answer crosses into the second bucket
    torch._dynamo.reset()
    llm.generate([prompt[:5]], fixed(4))  # warm-up: compiles the greedy step at span 128
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    with torch._dynamo.config.patch(error_on_recompile=True):
        first, second = llm.generate([prompt, prompt[:20]], [fixed(24), fixed(30)])
    spans_ran = [SPAN_BUCKET, 2 * SPAN_BUCKET] if model_runner.SPAN_COMPILES else []
    assert sorted(llm.runner._span_refs) == spans_ran
    assert compiled_before >= 1 and torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before
    assert list(first.token_ids) == hf_greedy(loaded, prompt, 24)
    assert list(second.token_ids) == hf_greedy(loaded, prompt[:20], 30)


def test_twenty_sampling_settings_share_one_graph(tiny):
    """Sampling parameters are per-slot tensors: a server cycling through settings never
    recompiles (nor reaches the recompile limit, past which `fullgraph=True` raises)."""
    llm = plain_llm(tiny("llama"), compile=True, max_num_seqs=2)
    llm.generate([PROMPT], fixed(2, temperature=0.5, seed=0))  # warm-up: the sampled step
    compiled_before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    settings = [dict(temperature=0.1 + 0.1 * i, top_k=None if i % 3 else 5 + i, top_p=None if i % 2 else 0.5 + i / 50,
                     seed=i) for i in range(20)]
    with torch._dynamo.config.patch(error_on_recompile=True):
        done = llm.generate([PROMPT] * 20, [fixed(3, **s) for s in settings])
    assert [len(c.token_ids) for c in done] == [3] * 20
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == compiled_before


def test_each_runner_compiles_its_own_step(tiny):
    """Every runner's step gets a code object of its own, so the compiled graphs of many
    configurations in one process never share dynamo's recompile limit of 8."""
    loaded = tiny("llama")
    codes = set()
    for i in range(10):  # more than the limit: models, shapes and settings of one process
        llm = plain_llm(loaded, compile=True, max_num_seqs=1 + i % 3, max_model_len=64 + 8 * i)
        (done,) = llm.generate([PROMPT[:4]], fixed(2))
        assert len(done.token_ids) == 2
        codes.add(llm.runner._steps[False, llm.runner.num_slots]._torchdynamo_orig_callable.__code__)
    assert len(codes) == 10
