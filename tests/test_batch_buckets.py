"""Batch buckets: the decode step runs over the smallest bucket of slots that holds every request
that advances. Tokens, probe scores and EMAs are those of the full-batch step, whatever the
schedule; a compiled engine uses a smaller bucket only after warm-up compiled it, and never
recompiles after that."""

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import hf_greedy
from probe_helpers import FakeClassifier, fixed, make_probe

PROMPTS = [[2, 17, 99, 45, 300, 12, 7], [2, 8, 9, 10], [2, 200, 201, 202, 203, 204], [2, 5, 6]]


def bucketed_llm(loaded, buckets, *, compile=False, max_num_seqs=4, probe=None, output_lag=None, prefill_chunk=256):
    from oc_engine.config import UNGUARDED, DebugOptions, EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    config = EngineConfig(compile=compile, max_num_seqs=max_num_seqs, max_model_len=128, batch_buckets=buckets,
                          prefill_chunk=prefill_chunk)
    guard = UNGUARDED if probe is None else GuardSetup(probe=probe, classifier=FakeClassifier(), record_trace=True,
                                                       policy=GuardConfig(refusal="REFUSED", max_held=1))
    return LLM(loaded, config, guard, debug=DebugOptions(output_lag=output_lag))


def record_buckets(llm) -> list[int]:
    """The bucket of every step the runner launches from now on."""
    seen, launch = [], llm.runner.launch

    def spy(sampled, keep_taps=False):
        seen.append(llm.runner.bucket(sampled))
        return launch(sampled, keep_taps)

    llm.runner.launch = spy
    return seen


def test_compiled_buckets_match_hf_generate_and_never_recompile_after_warm_up(tiny):
    """fp32: four answers of different lengths step down from 4 slots to 2 to 1, and a request
    joining a lone one lifts it to 2 again; every answer equals Hugging Face's."""
    loaded = tiny("llama")
    llm = bucketed_llm(loaded, (1, 2), compile=True)
    assert llm.runner.buckets == (1, 2, 4)
    llm.warm_up()
    assert {(s, b) for s in (False, True) for b in (1, 2, 4)} <= llm.runner._compiled
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    buckets = record_buckets(llm)
    lengths = [20, 12, 3, 6]  # slots 0..3: 4 advance, then slots 0 and 1 (bucket 2), then slot 0
    finished = {}

    def step():
        finished.update((e.request_id, e.completion) for e in llm.step() if type(e).__name__ == "Finished")

    with torch._dynamo.config.patch(error_on_recompile=True):
        done = llm.generate(PROMPTS, [fixed(n) for n in lengths])
        together = list(buckets)
        first = llm.add_request(PROMPTS[0], fixed(16))
        while len(buckets) < len(together) + 3:
            step()  # the lone request runs in bucket 1 ...
        alone = buckets[len(together):]
        joined = llm.add_request(PROMPTS[1], fixed(5))  # ... until another joins, in slot 1
        while llm.has_unfinished():
            step()
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert together == sorted(together, reverse=True) and set(together) == {4, 2, 1}
    assert set(alone) == {1} and 2 in buckets[len(together) + len(alone):]
    for completion, prompt, n in zip(done, PROMPTS, lengths):
        assert list(completion.token_ids) == hf_greedy(loaded, prompt, n)
    assert list(finished[first].token_ids) == hf_greedy(loaded, PROMPTS[0], 16)
    assert list(finished[joined].token_ids) == hf_greedy(loaded, PROMPTS[1], 5)


def test_a_compiled_engine_uses_smaller_buckets_only_after_warm_up(tiny):
    """Without warm-up no request waits for a compile it did not ask for: only the full batch
    (compiled on first use, as before) runs."""
    llm = bucketed_llm(tiny("llama"), (1, 2), compile=True)
    buckets = record_buckets(llm)
    llm.generate(PROMPTS[:2], [fixed(8), fixed(2)])
    assert set(buckets) == {4} and {b for _, b in llm.runner._compiled} == {4}


@settings(max_examples=16, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(family=st.sampled_from(["llama", "gemma4"]), lag=st.sampled_from([0, 1]), chunk=st.sampled_from([2, 256]),
       requests=st.lists(st.tuples(st.integers(0, 3), st.integers(1, 14), st.integers(0, 6), st.booleans()),
                         min_size=1, max_size=6))
def test_buckets_change_no_token_score_or_ema(tiny, family, lag, chunk, requests):
    """Any schedule (prompt, length, the step it arrives at, sampled or greedy), with a probe that
    pauses, with the host reading one step late, and with prompts going in two tokens a step
    while others decode (a slot mid-prefill, inside or outside the bucket): the same tokens,
    scores and EMAs as the full batch."""
    loaded = tiny(family)
    # The EMA rises near the pause threshold: answers pause now and then, and a paused one
    # stops advancing while others go on (its EMA must stay as it was).
    probe = make_probe(loaded.model, bias=0.5, warn=0.5, pause=0.6)

    def run(buckets):
        llm = bucketed_llm(loaded, buckets, probe=probe, output_lag=lag, prefill_chunk=chunk)
        used = record_buckets(llm)
        ids, seqs, finished, step = {}, {}, {}, 0
        pending = sorted(enumerate(requests), key=lambda r: r[1][2])
        while pending or llm.has_unfinished():
            while pending and pending[0][1][2] <= step:
                i, (prompt, n, _, sampled) = pending.pop(0)
                params = fixed(n, temperature=0.9, top_k=20, seed=i) if sampled else fixed(n)
                rid = llm.add_request(PROMPTS[prompt], params)
                ids[rid], seqs[i] = i, llm.engine.requests[rid]
            finished.update((ids[e.request_id], e.completion) for e in llm.step() if type(e).__name__ == "Finished")
            step += 1
        llm.close()
        rows = {i: [x for r in seq.guard.trace_rows() for x in (r["score"], r["ema"])] for i, seq in seqs.items()}
        return {i: list(c.token_ids) for i, c in finished.items()}, rows, used

    tokens, scores, used = run((1, 2))
    full_tokens, full_scores, full_used = run(())
    assert set(full_used) <= {4} and set(used) <= {1, 2, 4}
    if len(requests) == 1:
        assert set(used) == ({1} if requests[0][1] > 1 else set())  # a request alone runs in bucket 1
    assert tokens == full_tokens
    for i in scores:
        assert scores[i] == pytest.approx(full_scores[i], rel=1e-5, abs=1e-6)


def test_bucket_settings_are_checked(tiny):
    from oc_engine.config import EngineConfig
    from oc_engine.errors import OcEngineError

    assert EngineConfig(batch_buckets=[4, 1, 1]).batch_buckets == (1, 4)
    for bad in ((0,), (1, "2"), (True,), "1,2", 3):
        with pytest.raises(OcEngineError, match="batch_buckets"):
            EngineConfig(batch_buckets=bad)
    llm = bucketed_llm(tiny("llama"), (1, 8, 3))
    assert llm.runner.buckets == (1, 3, 4)  # at or above the slots: dropped


def test_the_cuda_path_updates_only_its_buckets_rows_of_the_ema_in_a_compiled_step(tiny):
    """On CUDA the step scores through the custom op, which updates the EMA in place: given the
    first rows of the buffer (a view) inside a compiled graph, it must write those rows back and
    leave the others, frozen rows included, as they were (checked here with the op on CPU)."""
    from oc_engine.guard.probe_runtime import ProbeRuntime

    probe = make_probe(tiny("llama").model, bias=0.3)
    runtimes = [ProbeRuntime(probe, 4, torch.device("cpu")) for _ in range(2)]
    for runtime in runtimes:
        runtime._probe_ema = torch.ops.oc_engine.probe_ema  # what `probe_ema_op` gives on CUDA
        runtime.ema.copy_(torch.tensor([0.2, 0.5, -1.0, 0.7]))
        runtime.active.copy_(torch.tensor([True, False, True, True]))
    hidden_size = probe.weight.shape[1]
    g = torch.Generator().manual_seed(0)
    torch._dynamo.reset()
    compiled = torch.compile(lambda runtime, hidden: runtime.score(hidden), fullgraph=True)
    for _ in range(3):
        hidden = torch.randn(1, 3, hidden_size, generator=g)  # a bucket of 3 of the 4 rows
        expected = runtimes[0].score(hidden)
        got = compiled(runtimes[1], hidden)
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)
        torch.testing.assert_close(runtimes[1].ema, runtimes[0].ema)
    assert runtimes[1].ema[1] == 0.5 and runtimes[1].ema[3] == 0.7  # frozen, and outside the bucket
    assert runtimes[1].ema[2] != -1.0  # scored
