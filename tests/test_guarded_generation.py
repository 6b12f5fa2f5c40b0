"""Guarded generation end to end on a tiny model: probe in the step, guard, classifier futures."""

import pytest
import torch

from oc_engine.kernels.probe_ema import probe_ema_reference
from probe_helpers import FakeClassifier, fixed, guarded_run, make_probe, plain_llm, summary

PROMPTS = [[2, 17, 99, 45, 300, 12, 7], [2, 5, 6, 7, 8, 9]]
CONFIG = fixed(12)
REFUSAL = "REFUSED"


class _Monitors:
    """The guards of one run, read by request index."""

    def __init__(self, seqs):
        self.seqs = seqs

    def summary(self, i):
        return summary(self.seqs[i].guard)


def _run(loaded, probe, classifier, compile=False, output_lag=None, **guard):
    seqs, _ = guarded_run(loaded, probe, classifier, PROMPTS, CONFIG, compile=compile, output_lag=output_lag,
                          collect_taps=True, refusal=REFUSAL, **guard)
    return None, seqs, _Monitors(seqs)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_scores_in_the_step_equal_the_reference_on_the_taps(tiny, compile):
    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=0.0, alpha=0.5)
    _, results, _ = _run(loaded, probe, FakeClassifier(), compile=compile)
    for r in results:
        ema = torch.tensor([-1.0])
        for tapped, score, got_ema in zip(r.taps, r.scores, r.emas):
            s, _ = probe_ema_reference(tapped.reshape(1, 1, -1), probe.weight, probe.bias, ema,
                                       torch.tensor([0.5, 0.5, 0.8]))
            assert score == pytest.approx(float(s[0]), abs=1e-5)
            assert got_ema == pytest.approx(float(ema[0]), abs=1e-5)


def test_a_quiet_probe_changes_nothing(tiny):
    loaded = tiny("gemma4")
    plain = plain_llm(loaded).generate(PROMPTS, CONFIG)
    _, results, monitor = _run(loaded, make_probe(loaded.model, bias=-20.0), None)
    for i, (p, r) in enumerate(zip(plain, results)):
        assert r.token_ids == list(p.token_ids)
        assert monitor.summary(i)["status"] == "completed"
        assert monitor.summary(i)["released_text"] == p.text


def test_allowed_escalations_release_the_same_text(tiny):
    loaded = tiny("llama")
    plain = plain_llm(loaded).generate(PROMPTS, CONFIG)
    classifier = FakeClassifier("allow", delay=0.01)
    _, results, monitor = _run(loaded, make_probe(loaded.model, bias=20.0), classifier, max_held=3)
    for i, p in enumerate(plain):
        summary = monitor.summary(i)
        assert summary["status"] == "completed" and summary["pause_points"]
        assert summary["released_text"] == p.text
        assert results[i].token_ids == list(p.token_ids)  # waiting rows resume exactly where they stopped
    assert classifier.calls


@pytest.mark.parametrize("classifier,reason", [
    (FakeClassifier("block"), "classifier verdict: block"),
    (None, "no classifier configured"),
    (FakeClassifier(error=RuntimeError("boom")), "classifier error"),
    (FakeClassifier(delay=5.0), "classifier timeout"),
])
def test_fail_closed_and_block_show_only_the_refusal(tiny, classifier, reason):
    loaded = tiny("llama")
    _, results, monitor = _run(loaded, make_probe(loaded.model, bias=20.0), classifier, deadline_s=0.2)
    for i, r in enumerate(results):
        summary = monitor.summary(i)
        assert summary["status"] == "blocked" and summary["reason"] == reason
        assert summary["released_text"] == REFUSAL  # paused at the first token: nothing else shown
        if reason != "classifier timeout":  # the others stop decoding at once; a timeout may come after the end
            assert r.finish_reason == "guard" and len(r.token_ids) < 12
        assert r.completion.refusal == REFUSAL and r.completion.text == ""  # the refusal is kept apart


def test_fail_closed_stop_mode_shows_nothing(tiny):
    loaded = tiny("llama")
    _, results, monitor = _run(loaded, make_probe(loaded.model, bias=20.0), None, on_failure="stop")
    assert [monitor.summary(i)["status"] for i in range(2)] == ["held", "held"]
    assert [monitor.summary(i)["released_text"] for i in range(2)] == ["", ""]


def test_probe_for_another_model_is_refused(tiny):
    from oc_engine.errors import OcEngineError

    probe = make_probe(tiny("qwen3").model, bias=0.0)
    with pytest.raises(OcEngineError, match="trained for another model"):
        guarded_run(tiny("llama"), probe, None, PROMPTS, CONFIG)


def test_compiled_guarded_step_does_not_recompile(tiny):
    loaded = tiny("llama")
    torch._dynamo.reset()
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    llm = LLM(loaded, EngineConfig(compile=True, max_num_seqs=2, max_model_len=128),
              GuardSetup(probe=make_probe(loaded.model, bias=0.0, layers=(-2, 1)), classifier=FakeClassifier("allow")))
    llm.generate(PROMPTS, fixed(2))
    with torch._dynamo.config.patch(error_on_recompile=True):
        results = llm.run(PROMPTS, CONFIG)
    assert all(len(r.scores) == 12 for r in results)


@pytest.mark.parametrize("verdict", ["allow", "block"])
def test_reading_flags_a_step_late_holds_the_same_tokens(tiny, verdict):
    """CUDA reads the probe flags one step behind the device; the guard must decide the same."""
    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=20.0)
    outcomes = []
    for lag in (0, 1):
        _, _, monitor = _run(loaded, probe, FakeClassifier(verdict, delay=0.01), output_lag=lag, max_held=3)
        outcomes.append([(s["status"], s["released_text"], s["pause_points"][:1])
                         for s in map(monitor.summary, range(len(PROMPTS)))])
    assert outcomes[0] == outcomes[1]


def test_replay_never_waits_and_shows_the_whole_answer(tiny):
    """Every token flagged, slow allows: each allow re-arms and the next flagged token pauses
    again, its check covering the answer up to it; no check is urgent while the answer is
    still decoding (it never waits below max_held), only those after its end, and the answer is
    shown whole."""
    loaded = tiny("llama")
    classifier = FakeClassifier("allow", delay=0.05)
    plain = plain_llm(loaded).generate(PROMPTS, CONFIG)
    _, results, monitor = _run(loaded, make_probe(loaded.model, bias=20.0), classifier, max_held=64)
    assert classifier.urgent and not classifier.urgent[0]
    for i, r in enumerate(plain):
        summary = monitor.summary(i)
        assert summary["status"] == "completed"
        assert summary["released_text"] == loaded.tokenizer.decode(r.token_ids, skip_special_tokens=True)
        assert len(summary["pause_points"]) == len(summary["verdicts"]) >= 2


@pytest.mark.parametrize("verdict", ["block", "error", "timeout"])
def test_an_input_check_that_does_not_allow_shows_no_model_token(tiny, verdict):
    loaded = tiny("llama")
    classifier = {"block": FakeClassifier("block"), "error": FakeClassifier(error=RuntimeError("boom")),
                  "timeout": FakeClassifier(delay=5.0)}[verdict]
    seqs, shown = guarded_run(loaded, make_probe(loaded.model, bias=-20.0), classifier, PROMPTS, CONFIG,
                              refusal=REFUSAL, input_check=True, deadline_s=0.2)
    for seq, seen in zip(seqs, shown):
        assert seen == REFUSAL and seq.completion.text == "" and seq.completion.refusal == REFUSAL
        first = seq.completion.guard.verdicts[0]
        assert first.input and first.covers == 0
    assert classifier.calls[:2] == ["", ""]  # the prompt alone, with an empty answer


def test_an_allowing_input_check_holds_the_first_tokens_then_shows_the_same_text(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM
    from oc_engine.outputs import TextReleased, VerdictReceived

    loaded = tiny("llama")
    plain = plain_llm(loaded).generate(PROMPTS[0], CONFIG)[0]
    classifier = FakeClassifier("allow", delay=0.05)  # several tokens are decoded meanwhile, held
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128),
              GuardSetup(probe=make_probe(loaded.model, bias=-20.0), classifier=classifier,
                         policy=GuardConfig(input_check=True)))
    events = list(llm.stream(PROMPTS[0], CONFIG))
    kinds = [type(e) for e in events]
    assert kinds.index(VerdictReceived) < kinds.index(TextReleased)
    assert events[kinds.index(VerdictReceived)].verdict.input
    assert "".join(e.text for e in events if isinstance(e, TextReleased)) == plain.text


def test_a_non_streaming_call_judges_the_whole_answer_and_a_stream_does_not(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    classifier = FakeClassifier("allow")
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128),
              GuardSetup(probe=make_probe(loaded.model, bias=-20.0), classifier=classifier))
    (whole,) = llm.generate([PROMPTS[0]], CONFIG)
    assert [(v.final, v.covers) for v in whole.guard.verdicts] == [(True, 12)]
    finished = list(llm.stream(PROMPTS[0], CONFIG))[-1].completion
    assert finished.guard.verdicts == () and finished.text == whole.text


def test_decoding_yields_to_a_check_past_a_quarter_of_its_deadline(tiny):
    """On a CPU a full batch can starve the classifier's worker; a check that has waited past
    OVERDUE_SHARE of its deadline makes the next step wait for verdicts instead of decoding."""
    import time

    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.monitor import OVERDUE_SHARE
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    classifier = FakeClassifier("allow", delay=1.5)
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128),
              GuardSetup(probe=make_probe(loaded.model, bias=20.0), classifier=classifier,
                         policy=GuardConfig(deadline_s=4.0, max_held=64)))
    rid = llm.add_request(PROMPTS[0], CONFIG)
    llm.step()  # prefill: the first token pauses, its check is submitted
    seq = llm.engine.requests[rid]
    llm.step()  # the check is young: decoding goes on
    assert len(seq.token_ids) == 2 and not seq.guard.overdue()
    while not seq.guard.overdue():
        time.sleep(0.01)
    assert time.perf_counter() - seq.guard.pending.submitted >= OVERDUE_SHARE * 4.0
    llm.step()  # yields until the allow arrives (1.5 s after submission), decodes nothing
    assert len(seq.token_ids) == 2 and [v.verdict for v in seq.guard.verdicts] == ["allow"]
    while llm.has_unfinished():
        llm.step()
    assert seq.completion.guard.status == "completed"


def test_a_non_streaming_answer_blocked_at_its_final_check_shows_only_the_refusal(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128),
              GuardSetup(probe=make_probe(loaded.model, bias=-20.0), classifier=FakeClassifier("block")))
    (whole,) = llm.generate([PROMPTS[0]], CONFIG)
    assert whole.guard.status == "blocked" and whole.guard.verdicts[-1].final
    assert whole.text == "" and whole.token_ids == () and whole.guard.released_tokens == 0
    assert whole.refusal is not None and len(whole.guard.verdicts) == 1


def test_a_finished_answer_is_handed_back_before_a_step_blocks_on_another(tiny):
    """One request holds at max_held on a check that never answers (deadline 120 s); another
    finishes meanwhile. Its Finished must come back from the step that made it, not after the
    step has waited out the first one's deadline (the server held it for 120 s)."""
    import concurrent.futures as cf
    import threading
    from dataclasses import replace

    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM
    from oc_engine.outputs import Finished

    class HangsOnW9:
        """Never answers a w9 prompt; allows any other at once (its verdict is there when the
        next step begins, the case that blocked)."""

        def submit(self, prompt, response, urgent=False, judged_chars=0):
            future = cf.Future()
            if not prompt.startswith("w9"):
                future.set_result({"verdict": "allow", "p_unsafe": 0.0})
            return future

    loaded = tiny("llama")
    policy = GuardConfig(every=1, max_held=4, refusal=REFUSAL)
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=64),
              GuardSetup(probe=make_probe(loaded.model, bias=20.0), classifier=HangsOnW9(), policy=policy))
    hanging = llm.prepare_request("w9 w7", fixed(24), stream=True, guard=replace(policy, deadline_s=120.0))
    llm.add_request(hanging)
    while not hanging.guard.must_wait:
        llm.step()
    fired = threading.Event()
    rescue = threading.Timer(60, lambda: (fired.set(), llm.wake()))  # a failing test ends, not hangs
    rescue.start()
    try:
        quick = llm.prepare_request("w5 w6", fixed(3), stream=True)
        llm.add_request(quick)
        finished = []
        while not finished:
            finished = [e for e in llm.step() if isinstance(e, Finished) and e.request_id == quick.request_id]
        assert not fired.is_set(), "the finished answer waited for the other request's deadline"
        assert finished[0].completion.guard.status == "completed"
    finally:
        rescue.cancel()
        llm.cancel(hanging.request_id)
        llm.step()


def test_an_input_check_that_blocks_while_the_prompt_goes_in_chunk_by_chunk(tiny):
    """The verdict on the prompt arrives before its last chunk: the request ends with the
    refusal and no model token, its slot is free again, and the next request runs as usual."""
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM
    from oc_engine.outputs import Refused, TextReleased

    loaded = tiny("llama")
    prompt = list(range(2, 40))  # 38 tokens, one per step
    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=1, max_model_len=128, prefill_chunk=1),
              GuardSetup(probe=make_probe(loaded.model, bias=-20.0), classifier=FakeClassifier("block"),
                         policy=GuardConfig(input_check=True, refusal=REFUSAL)))
    events = list(llm.stream(prompt, CONFIG))
    assert "".join(e.text for e in events if isinstance(e, (TextReleased, Refused))) == REFUSAL
    done = events[-1].completion
    assert done.generated_tokens == 0 and done.guard.status == "blocked" and done.guard.verdicts[0].input
    assert not llm.engine.prefilling and llm.engine.scheduler.free_slots == 1
    assert llm.generate(PROMPTS[0], CONFIG)[0].refusal == REFUSAL  # the next one runs (and is blocked too)
