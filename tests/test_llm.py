"""The public `LLM`: continuous batching gives every request the tokens it gets alone (fp32,
equal to Hugging Face generate), slots are freed and reused at once, cancel and stream work
while other requests run, and a request's guard decisions do not depend on its neighbours."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import hf_greedy
from oc_engine.errors import OcEngineError
from oc_engine.outputs import Finished, Paused, Refused, TextReleased, VerdictReceived
from probe_helpers import FakeClassifier, fixed, guarded_run, make_probe, plain_llm
from tiny_models import FAMILIES

PROMPTS = [[2, 17, 99, 45, 300], [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 120], [2, 400, 401, 402, 403, 4, 8, 9]]
LENGTHS = [12, 20, 7]


def drive(llm, schedule):
    """schedule: (steps to run before adding, prompt, params) per request, in arrival order.
    Returns the completions by arrival index."""
    ids, done = [], {}

    def step():
        for event in llm.step():
            if isinstance(event, Finished):
                done[event.request_id] = event.completion

    for wait, prompt, params in schedule:
        for _ in range(wait):
            step()
        ids.append(llm.add_request(prompt, params))
    while llm.has_unfinished():
        step()
    return [done[i] for i in ids]


@pytest.mark.parametrize("family", FAMILIES)
def test_joining_mid_flight_gives_the_tokens_of_hf_generate(tiny, family):
    loaded = tiny(family)
    llm = plain_llm(loaded, max_num_seqs=2)  # three requests, two slots: the third waits for a free one
    schedule = [(0, PROMPTS[0], fixed(LENGTHS[0])), (3, PROMPTS[1], fixed(LENGTHS[1])),
                (2, PROMPTS[2], fixed(LENGTHS[2]))]
    for (_, prompt, _), n, completion in zip(schedule, LENGTHS, drive(llm, schedule)):
        assert list(completion.token_ids) == hf_greedy(loaded, prompt, n)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("family,compile", [("llama", False), ("gemma4", False), ("llama", True)])
def test_alone_in_a_batch_or_joining_the_tokens_are_the_same(tiny, family, compile):
    llm = plain_llm(tiny(family), compile=compile, max_num_seqs=3)
    params = [fixed(n) for n in LENGTHS]
    alone = [llm.generate([p], q)[0].token_ids for p, q in zip(PROMPTS, params)]
    assert [c.token_ids for c in llm.generate(PROMPTS, params)] == alone
    joined = drive(llm, [(0, PROMPTS[1], params[1]), (4, PROMPTS[0], params[0]), (1, PROMPTS[2], params[2])])
    assert [c.token_ids for c in joined] == [alone[1], alone[0], alone[2]]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("chunk", [1, 3])
def test_a_prompt_prefilled_in_chunks_between_decode_steps_gives_the_same_tokens(tiny, family, chunk):
    """Each prompt goes in `chunk` tokens per step while the others decode: greedy tokens equal
    Hugging Face generate, and sampled ones those of a prompt prefilled at once."""
    loaded = tiny(family)
    chunked = plain_llm(loaded, max_num_seqs=2, prefill_chunk=chunk)
    schedule = [(0, PROMPTS[0], fixed(LENGTHS[0])), (3, PROMPTS[1], fixed(LENGTHS[1])),
                (2, PROMPTS[2], fixed(LENGTHS[2]))]
    for (_, prompt, _), n, completion in zip(schedule, LENGTHS, drive(chunked, schedule)):
        assert list(completion.token_ids) == hf_greedy(loaded, prompt, n)
    sampled = [fixed(n, temperature=0.9, seed=7) for n in LENGTHS]
    whole = plain_llm(loaded, max_num_seqs=2, prefill_chunk=None)
    assert [c.token_ids for c in chunked.generate(PROMPTS, sampled)] == \
        [c.token_ids for c in whole.generate(PROMPTS, sampled)]


@pytest.mark.parametrize("family", FAMILIES)
def test_prompts_arriving_together_go_in_one_pass_with_the_tokens_of_hf_generate(tiny, family):
    """Prompts of different lengths, right-padded into one forward pass: each gets Hugging Face
    generate's greedy tokens, and sampled ones those it gets prefilled one after another."""
    loaded = tiny(family)
    llm = plain_llm(loaded, max_num_seqs=3)
    runner, groups = llm.engine.runner, []
    together = runner.prefill_together
    runner.prefill_together = lambda prompts: groups.append(len(prompts)) or together(prompts)
    completions = llm.generate(PROMPTS, [fixed(n) for n in LENGTHS])
    assert groups == [3]
    for prompt, n, completion in zip(PROMPTS, LENGTHS, completions):
        assert list(completion.token_ids) == hf_greedy(loaded, prompt, n)
    sampled = [fixed(n, temperature=0.9, seed=7) for n in LENGTHS]
    batched = [c.token_ids for c in llm.generate(PROMPTS, sampled)]
    runner.prefill_together = lambda prompts: [runner.prefill(*p) for p in prompts]
    assert [c.token_ids for c in llm.generate(PROMPTS, sampled)] == batched
    assert groups == [3, 3]


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_a_prompt_prefilled_with_others_gives_the_probe_what_it_gives_alone(tiny, family):
    from oc_engine.engine.model_runner import ModelRunner
    from oc_engine.params import SamplingConfig

    loaded = tiny(family)
    runner = ModelRunner(loaded, num_slots=3, max_model_len=64, compile=False, probe=make_probe(loaded.model, bias=0.0))
    prompts = [(slot, prompt, SamplingConfig(), slot) for slot, prompt in enumerate(PROMPTS)]
    alone = [runner.prefill(*p) for p in prompts]
    cached = [(runner.cache.keys[0][slot, :, :len(p)].clone(), runner.cache.values[0][slot, :, :len(p)].clone())
              for slot, p in enumerate(PROMPTS)]
    for slot in range(3):
        runner.release(slot)
    together = runner.prefill_together([prompts[2], prompts[0], prompts[1]])  # any slot order
    for one, (token, score, ema, flags, tapped) in zip([alone[2], alone[0], alone[1]], together):
        assert (token, flags) == (one[0], one[3])
        assert score == pytest.approx(one[1], abs=1e-6) and ema == pytest.approx(one[2], abs=1e-6)
        assert torch.allclose(tapped, one[4], rtol=1e-4, atol=1e-4)  # fp32, other matmul shapes
    for slot, (keys, values) in enumerate(cached):  # each prompt's K/V where it was alone
        assert torch.allclose(runner.cache.keys[0][slot, :, :len(PROMPTS[slot])], keys, rtol=1e-4, atol=1e-4)
        assert torch.allclose(runner.cache.values[0][slot, :, :len(PROMPTS[slot])], values, rtol=1e-4, atol=1e-4)


def test_prompts_go_in_together_only_while_their_padded_batch_fits_the_chunk(tiny):
    llm = plain_llm(tiny("llama"), max_num_seqs=3, prefill_chunk=30)
    runner, groups = llm.engine.runner, []
    together = runner.prefill_together
    runner.prefill_together = lambda prompts: groups.append([len(p) for _, p, _, _ in prompts]) or together(prompts)
    llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [fixed(2)] * 3)
    # 5 and 8 tokens: 2 x 8 = 16 padded fit 30; with 14 more, 27 tokens fit but 3 x 14 = 42 padded do not.
    assert groups == [[5, 8], [14]]


def test_a_long_prompt_joining_leaves_the_running_requests_decoding(tiny):
    """While a prompt goes in a chunk per step, the running request gets a token every step."""
    llm = plain_llm(tiny("llama"), max_num_seqs=2, prefill_chunk=2)
    running = llm.engine.requests[llm.add_request(PROMPTS[0], fixed(30))]
    while not running.token_ids:  # its prefill, 2 tokens per step
        llm.step()
    joining = llm.engine.requests[llm.add_request(PROMPTS[1], fixed(4))]  # 14 tokens: 7 chunks
    new_tokens = []
    while joining.first_token_at is None:
        before = len(running.token_ids)
        llm.step()
        new_tokens.append(len(running.token_ids) - before)
    assert new_tokens == [1] * 6 + [0]  # the last chunk samples the first token, and that step ends there


@pytest.mark.slow
def test_embedded_model_joining_mid_flight_matches_hf_generate(embedded_fp32):
    from oc_engine.engine.prompts import render_prompt

    prompts = [render_prompt(embedded_fp32.tokenizer, p) for p in ("Explain SQL injection at a high level",
                                                                    "Name three colours.")]
    llm = plain_llm(embedded_fp32, compile=True, max_num_seqs=2, max_model_len=256)
    first, second = drive(llm, [(0, prompts[0], fixed(40)), (5, prompts[1], fixed(24))])
    assert list(first.token_ids) == hf_greedy(embedded_fp32, prompts[0], 40)
    assert list(second.token_ids) == hf_greedy(embedded_fp32, prompts[1], 24)


def test_a_finished_request_frees_its_slot_at_once(tiny):
    llm = plain_llm(tiny("llama"), max_num_seqs=2)
    seqs = llm.run(PROMPTS, [fixed(3), fixed(20), fixed(5)])
    short, long_, waiting = seqs
    assert waiting.prefill_start < long_.decode_end  # it took the short one's slot while the long one ran
    assert waiting.prefill_start >= short.decode_end
    assert [len(s.token_ids) for s in seqs] == [3, 20, 5]


@pytest.mark.parametrize("lag", [0, 1])
def test_reading_outputs_a_step_late_changes_nothing(tiny, lag):
    """The CUDA pipeline (the host reads each step one step behind), run on CPU, with joins."""
    loaded = tiny("llama")
    schedule = [(0, PROMPTS[0], fixed(9)), (2, PROMPTS[1], fixed(14)), (1, PROMPTS[2], fixed(4))]
    direct = drive(plain_llm(loaded, max_num_seqs=2, output_lag=0), schedule)
    lagged = drive(plain_llm(loaded, max_num_seqs=2, output_lag=lag), schedule)
    assert [(c.token_ids, c.text) for c in direct] == [(c.token_ids, c.text) for c in lagged]


def test_eos_ends_one_sequence_and_not_the_others(tiny):
    llm = plain_llm(tiny("llama"))
    alone = [list(c.token_ids) for c in llm.generate(PROMPTS, fixed(16))]
    eos = alone[0][3]
    llm.engine.eos_ids = {eos}
    for tokens, c in zip(alone, llm.generate(PROMPTS, [fixed(16, ignore_eos=False)] * 3)):
        expected = tokens[:tokens.index(eos) + 1] if eos in tokens else tokens
        assert list(c.token_ids) == expected
        assert c.finish_reason == ("eos" if eos in tokens else "length")


def test_cancel_frees_the_slot_and_leaves_the_others_alone(tiny):
    llm = plain_llm(tiny("llama"), max_num_seqs=2)
    alone = [llm.generate([p], fixed(n))[0].token_ids for p, n in zip(PROMPTS, LENGTHS)]
    a = llm.add_request(PROMPTS[0], fixed(LENGTHS[0]))
    b = llm.add_request(PROMPTS[1], fixed(LENGTHS[1]))
    c = llm.add_request(PROMPTS[2], fixed(LENGTHS[2]))  # waits: both slots are taken
    events = llm.step() + llm.step()
    assert llm.cancel(b)
    assert not llm.cancel(b) and not llm.cancel("no-such-request")  # a no-op that says so
    while llm.has_unfinished():
        events += llm.step()
    done = {e.request_id: e.completion for e in events if isinstance(e, Finished)}
    assert done[b].finish_reason == "cancelled" and 0 < len(done[b].token_ids) < LENGTHS[1]
    assert (done[a].token_ids, done[c].token_ids) == (alone[0], alone[2])
    assert not llm.cancel(a)  # finished


def test_stream_yields_the_released_text_while_another_request_runs(tiny):
    llm = plain_llm(tiny("llama"), max_num_seqs=2)
    first, second = llm.stream(PROMPTS[0], fixed(10)), llm.stream(PROMPTS[1], fixed(6))
    events = {0: [], 1: []}
    for _ in range(3):  # interleave the two consumers
        events[0].append(next(first))
        events[1].append(next(second))
    events[0] += list(first)
    events[1] += list(second)
    for i, n in ((0, 10), (1, 6)):
        finished = events[i][-1]
        assert isinstance(finished, Finished) and len(finished.completion.token_ids) == n
        assert "".join(e.text for e in events[i] if isinstance(e, TextReleased)) == finished.completion.text
        assert finished.completion.token_ids == llm.generate([PROMPTS[i]], fixed(n))[0].token_ids


def test_a_guarded_stream_reports_pauses_verdicts_and_the_refusal_apart(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=1, max_model_len=64),
              GuardSetup(probe=make_probe(loaded.model, bias=20.0), classifier=FakeClassifier("block"),
                         policy=GuardConfig(refusal="NO")))
    events = list(llm.stream(PROMPTS[0], fixed(8)))
    kinds = [type(e) for e in events]
    assert kinds[:1] == [Paused] and VerdictReceived in kinds and kinds[-2:] == [Refused, Finished]
    completion = events[-1].completion
    assert completion.text == "" and completion.refusal == "NO" and completion.guard.status == "blocked"
    assert completion.guard.verdicts[0].verdict == "block"  # (decoding may have ended first: timing)


def test_bad_requests_are_refused_before_they_queue(tiny):
    llm = plain_llm(tiny("llama"))
    with pytest.raises(OcEngineError, match="too long for max_model_len 128"):
        llm.add_request([2] * 128)
    with pytest.raises(OcEngineError, match="empty after tokenization"):
        llm.generate([[]])
    with pytest.raises(OcEngineError, match="one SamplingParams, or one per prompt"):
        llm.generate(PROMPTS, [fixed(2)])
    with pytest.raises(OcEngineError, match="must be text, a list of token ids"):
        llm.generate([3.5])
    rid = llm.add_request(PROMPTS[0], fixed(2), request_id="mine")
    with pytest.raises(OcEngineError, match="already in use"):
        llm.add_request(PROMPTS[1], request_id="mine")
    assert rid == "mine" and llm.engine.requests.keys() == {"mine"}
    with pytest.raises(OcEngineError, match="max_num_seqs"):
        plain_llm(tiny("llama"), max_num_seqs=0)


def _verdict_by_content(response: str) -> str:
    """A deterministic classifier: its verdict depends only on the text it judges."""
    return ("allow", "allow", "block", "uncertain")[sum(map(ord, response)) % 4]


class ContentClassifier(FakeClassifier):
    def submit(self, prompt, response, urgent=False, judged_chars=0):
        self.calls.append(response)
        return self.pool.submit(lambda: {"verdict": _verdict_by_content(response), "p_unsafe": 0.5})


@settings(max_examples=12, deadline=None)
@given(order=st.permutations(range(3)), waits=st.lists(st.integers(0, 4), min_size=3, max_size=3),
       slots=st.integers(1, 3), max_held=st.integers(1, 4))
def test_guard_decisions_do_not_depend_on_arrival_order_or_neighbours(tiny, order, waits, slots, max_held):
    """Each request's shown text, status, pause points and verdicts are those it gets alone,
    whatever order and moment the requests arrive in and however many share the step."""
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=0.0, warn=0.5, pause=0.5)

    def outcome(c):
        return (c.text, c.refusal, c.guard.status, c.guard.pause_points, [(v.verdict, v.covers)
                                                                           for v in c.guard.verdicts])
    params = [fixed(n) for n in LENGTHS]
    alone = []
    for i in range(3):
        (seq,), _ = guarded_run(loaded, probe, ContentClassifier(), [PROMPTS[i]], params[i], max_held=max_held,
                                refusal="NO")
        alone.append(outcome(seq.completion))
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=slots, max_model_len=128),
              GuardSetup(probe=probe, classifier=ContentClassifier(),
                         policy=GuardConfig(max_held=max_held, refusal="NO")))
    together = drive(llm, [(waits[k], PROMPTS[i], params[i]) for k, i in enumerate(order)])
    for k, i in enumerate(order):
        assert outcome(together[k]) == alone[i]


def test_llm_is_an_engine_and_settings_fail_on_construction(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.engine.interface import AsyncEngine, Engine

    llm = plain_llm(tiny("llama"), max_num_seqs=3)
    assert isinstance(llm, Engine) and isinstance(llm.async_engine(), AsyncEngine)
    assert (llm.capacity, llm.vocab_size) == (3, llm.loaded.model.get_output_embeddings().out_features)
    for bad, message in [(dict(max_num_seqs=True), "max_num_seqs must be an integer >= 1"),
                         (dict(max_num_seqs=0), "max_num_seqs must be an integer >= 1"),
                         (dict(max_model_len=1), "max_model_len must be an integer >= 2"),
                         (dict(dtype="fp8"), "dtype must be one of"),
                         (dict(quantize="int3"), "unknown quantization 'int3'"),
                         (dict(compile="yes"), "compile must be true or false")]:
        with pytest.raises(OcEngineError, match=message):
            EngineConfig(**bad)
    with pytest.raises(OcEngineError, match="a guard policy needs a probe"):
        from oc_engine.guard.policy import GuardConfig

        GuardSetup(probe=None, policy=GuardConfig())
    with pytest.raises(OcEngineError, match="max_model_len must be an integer in"):
        plain_llm(tiny("llama"), max_model_len=10 ** 7)
