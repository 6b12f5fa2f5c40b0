"""Fault injection: the guard's promise when the classifier or the numbers misbehave.

The promise, in every case: no token at or after a pause point is shown unless a well-formed
allow that arrived within the deadline covered it, and a sequence the guard stopped says why.
Faults: a classifier that raises (on submit or in its worker), hangs, answers NaN, answers in
the wrong shape or with an unknown verdict, or allows after its deadline; NaN and inf scores
and hidden states (driven through the compiled step); an interruption while tokens are held.
"""

import concurrent.futures as cf
import math
import threading

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from oc_engine.guard.policy import NONFINITE, PAUSE, WARN, GuardConfig
from oc_engine.outputs import Refused, TextReleased
from probe_helpers import FakeClassifier, feed, fixed, guarded_run, make_probe, monitored, plain_llm
from probe_helpers import summary as summarize

REFUSAL = "REFUSED"
DEADLINE = 2.0  # fake seconds; the driver's clock ticks 1 per token
# How a scripted classifier answers a check: (kind, fake seconds until the future resolves).
GOOD = ("allow", "block", "uncertain")
FAULTS = ("raise_on_submit", "raise", "hang", "nan", "negative", "not_a_dict", "no_verdict", "unknown_verdict",
          "late_allow", "not_a_future")


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class ScriptedClassifier:
    """Answers the k-th check as outcomes[k] says; the driver resolves the futures on its clock."""

    def __init__(self, outcomes, clock):
        self.outcomes, self.clock = outcomes, clock
        self.scheduled: list[tuple[float, cf.Future, object, bool]] = []  # due, future, result, is exception
        self.valid_allows: list[str] = []  # responses that a well-formed, in-time allow judged
        self.calls = 0

    def submit(self, prompt, response, urgent=False, judged_chars=0):
        kind = self.outcomes[self.calls % len(self.outcomes)]
        self.calls += 1
        if kind == "raise_on_submit":
            raise RuntimeError("injected: submit failed")
        if kind == "not_a_future":
            return {"verdict": "allow"}
        future = cf.Future()
        now = self.clock()
        if kind == "hang":
            return future  # never resolved
        if kind == "late_allow":  # resolves after the deadline but before the next poll
            self.scheduled.append((now + DEADLINE + 0.5, future, {"verdict": "allow", "p_unsafe": 0.0}, False))
            return future
        result, error = {
            "allow": ({"verdict": "allow", "p_unsafe": 0.1}, False),
            "block": ({"verdict": "block", "p_unsafe": 0.9}, False),
            "uncertain": ({"verdict": "uncertain", "p_unsafe": 0.5}, False),
            "raise": (RuntimeError("injected: worker failed"), True),
            "nan": ({"verdict": "allow", "p_unsafe": float("nan")}, False),
            "negative": ({"verdict": "allow", "p_unsafe": -0.5}, False),
            "not_a_dict": (["allow"], False),
            "no_verdict": ({"p_unsafe": 0.1}, False),
            "unknown_verdict": ({"verdict": "fine", "p_unsafe": 0.1}, False),
        }[kind]
        if kind == "allow":
            self.valid_allows.append(response)
        self.scheduled.append((now + 1.0, future, result, error))
        return future

    def resolve_due(self):
        """Resolve the futures due by now, each at its due time (what the monitor records)."""
        keep = []
        for due, future, result, error in self.scheduled:
            if due > self.clock.now:
                keep.append((due, future, result, error))
                continue
            now, self.clock.now = self.clock.now, due
            future.set_exception(result) if error else future.set_result(result)
            self.clock.now = now
        self.scheduled = keep


def drive(tokenizer, tokens, scores, outcomes, config):
    """Feed one sequence token by token into a SequenceMonitor on a fake clock; returns
    (monitor, classifier, shown text: the released text and any refusal, as the user saw them)."""
    clock = FakeClock()
    classifier = ScriptedClassifier(outcomes, clock)
    monitor = monitored(tokenizer, "a prompt", config, classifier, clock=clock)
    fed = 0
    for _ in range(10 * len(tokens) + 100):
        clock.now += 1.0
        classifier.resolve_due()
        monitor.poll()
        if fed < len(tokens) and monitor.wants_tokens and not monitor.must_wait:
            score = scores[fed]
            flags = (WARN | PAUSE) if score >= 0.5 else 0
            feed(monitor, tokens[fed], score, score, flags)
            fed += 1
            if fed == len(tokens):
                monitor.on_finish()
        elif monitor.pending is None and (fed == len(tokens) or not monitor.wants_tokens):
            break
    assert monitor.pending is None, "a check was left unanswered"
    monitor.finish()
    shown = "".join(e.text for e in monitor.take_events() if isinstance(e, (TextReleased, Refused)))
    return monitor, classifier, shown


scores = st.lists(st.sampled_from([0.1, 0.1, 0.1, 0.7, float("nan"), float("inf")]), min_size=1, max_size=24)
outcomes = st.lists(st.sampled_from(GOOD + GOOD + FAULTS), min_size=1, max_size=8)
configs = st.builds(GuardConfig, every=st.integers(1, 2), uncertain=st.sampled_from(["final", "block"]),
                    on_failure=st.sampled_from(["block", "stop"]), final_check=st.booleans(),
                    max_held=st.integers(1, 5), deadline_s=st.just(DEADLINE), refusal=st.just(REFUSAL))


@settings(max_examples=300, deadline=None)
@given(scores=scores, outcomes=outcomes, config=configs)
def test_nothing_held_is_shown_whatever_the_classifier_does(tiny, scores, outcomes, config):
    tokenizer = tiny("llama").tokenizer
    tokens = [10 + i for i in range(len(scores))]
    monitor, classifier, shown = drive(tokenizer, tokens, scores, outcomes, config)
    guard = monitor.policy
    summary = summarize(monitor)
    assert shown == summary["released_text"]
    released_ids = tokens[:guard.released]
    answer = tokenizer.decode(released_ids, skip_special_tokens=True)
    assert shown in (answer, answer + REFUSAL) and shown.startswith(answer)
    # Every shown pause point, and every shown token with a non-finite score (whatever the
    # cadence), was covered by a well-formed, in-time allow (of its own check, or of a later one:
    # the final check covers the whole answer).
    must_be_covered = set(guard.pause_points) | {i for i, s in enumerate(scores) if not math.isfinite(s)}
    for point in sorted(must_be_covered):
        if guard.released > point:
            covered = tokenizer.decode(tokens[:point + 1], skip_special_tokens=True)
            assert any(v == covered or v.startswith(covered + " ") for v in classifier.valid_allows), \
                f"token {point} was shown without a valid allow covering it"
    # A fault the guard acted on is named in the status.
    faults = [v for v in summary["verdicts"] if v["verdict"] in ("error", "timeout")]
    if faults:
        assert summary["status"] in ("blocked", "held")
        assert summary["reason"] == f"classifier {faults[0]['verdict']}"


@pytest.mark.parametrize("kind,reason,detail", [
    ("raise_on_submit", "classifier error", "RuntimeError: injected: submit failed"),
    ("raise", "classifier error", "RuntimeError: injected: worker failed"),
    ("hang", "classifier timeout", None),
    ("late_allow", "classifier timeout", None),
    ("nan", "classifier error", "p_unsafe nan"),
    ("not_a_dict", "classifier error", "not a dict"),
    ("no_verdict", "classifier error", "unknown verdict None"),
    ("unknown_verdict", "classifier error", "unknown verdict 'fine'"),
    ("not_a_future", "classifier error", "not a future"),
])
def test_each_fault_fails_closed_and_says_why(tiny, kind, reason, detail):
    tokenizer = tiny("llama").tokenizer
    monitor, _, shown = drive(tokenizer, [10, 11, 12, 13, 14], [0.1, 0.7, 0.1, 0.1, 0.1], [kind],
                              GuardConfig(deadline_s=DEADLINE, refusal=REFUSAL))
    summary = summarize(monitor)
    assert summary["status"] == "blocked" and summary["reason"] == reason
    assert shown == tokenizer.decode([10]) + REFUSAL  # the pause point (token 1) and after: never shown
    if detail:
        assert detail in summary["verdicts"][-1]["error"]


def test_a_late_allow_is_a_timeout_even_when_read_before_the_deadline_check(tiny):
    """The verdict arrives 2.5 s after its check, with a 2 s deadline; the monitor reads it at
    3 s, when the future is already done. Judged by arrival, it is a timeout."""
    tokenizer = tiny("llama").tokenizer
    monitor, _, shown = drive(tokenizer, [10, 11, 12], [0.7, 0.1, 0.1], ["late_allow"],
                              GuardConfig(deadline_s=DEADLINE, refusal=REFUSAL, on_failure="stop"))
    (verdict,) = summarize(monitor)["verdicts"]
    assert verdict["verdict"] == "timeout" and verdict["latency_ms"] == 2500.0
    assert shown == "" and summarize(monitor)["status"] == "held"


# -- through the engine: real threads, real decode steps --------------------------------------
PROMPTS = [[2, 17, 99, 45, 300, 12, 7], [2, 5, 6, 7, 8, 9]]
CONFIG = fixed(10)


class HangingClassifier:
    def __init__(self):
        self.release = threading.Event()
        self.pool = cf.ThreadPoolExecutor(max_workers=2)

    def submit(self, prompt, response, urgent=False, judged_chars=0):
        return self.pool.submit(lambda: (self.release.wait(30), {"verdict": "allow"})[1])


class ValueClassifier(FakeClassifier):
    """Answers `value` (anything: a malformed answer too) after `delay` seconds."""

    def __init__(self, value, delay=0.0):
        super().__init__(delay=delay)
        self.value = value

    def _run(self, verdict):
        import time
        time.sleep(self.delay)
        return self.value


def _guarded(loaded, probe, classifier, compile=False, **guard):
    seqs, shown = guarded_run(loaded, probe, classifier, PROMPTS, CONFIG, compile=compile, refusal=REFUSAL, **guard)
    return seqs, [s.guard for s in seqs], shown


@pytest.mark.parametrize("classifier,reason", [
    (HangingClassifier(), "classifier timeout"),
    (ValueClassifier({"verdict": "allow", "p_unsafe": float("nan")}), "classifier error"),
    (ValueClassifier({"verdict": "allow"}, delay=0.4), "classifier timeout"),  # a late allow
    (ValueClassifier("allow"), "classifier error"),
], ids=["hangs", "nan", "late-allow", "wrong-shape"])
def test_engine_fails_closed_on_classifier_faults(tiny, classifier, reason):
    loaded = tiny("llama")
    try:
        _, monitor, shown = _guarded(loaded, make_probe(loaded.model, bias=20.0), classifier, deadline_s=0.2)
    finally:
        if isinstance(classifier, HangingClassifier):
            classifier.release.set()
    for i in range(2):
        summary = summarize(monitor[i])
        assert (summary["status"], summary["reason"]) == ("blocked", reason)
        assert shown[i] == summary["released_text"] == REFUSAL  # paused at the first token


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_non_finite_hidden_states_pause_through_the_step(tiny, compile):
    """inf in the embedding of a token the model generates: the step fed that token taps
    inf/NaN hidden states; the probe op scores it NaN and flags it non-finite, and the guard
    pauses there. No classifier: nothing from that token on is shown."""
    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=-20.0)  # never pauses on finite scores
    plain = list(plain_llm(loaded).generate(PROMPTS[:1], CONFIG)[0].token_ids)
    poison = next(t for t in plain[2:] if t not in PROMPTS[0] and t not in plain[:2])
    at = plain.index(poison)  # the step fed this token scores the next one
    weight = loaded.model.get_input_embeddings().weight
    saved = weight[poison].clone()
    # The fingerprint samples the embedding's signs; inf keeps a row's signs only where it was >= 0.
    try:
        weight.data[poison] = torch.where(saved < 0, torch.full_like(saved, -float("inf")),
                                          torch.full_like(saved, float("inf")))
        (result,), (shown,) = guarded_run(loaded, probe, None, PROMPTS[:1], CONFIG, compile=compile,
                                          refusal=REFUSAL)
    finally:
        weight.data[poison] = saved
    monitor = result.guard
    assert result.token_ids[:at + 1] == plain[:at + 1]
    assert all(math.isfinite(s) for s in result.scores[:at + 1])
    assert math.isnan(result.scores[at + 1])
    summary = summarize(monitor)
    assert summary["pause_points"] == [at + 1] and summary["reason"] == "no classifier configured"
    assert shown == loaded.tokenizer.decode(plain[:at + 1], skip_special_tokens=True) + REFUSAL
    assert any(e.get("nonfinite") for e in monitor.policy.events)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("bias", [float("nan"), float("inf"), -float("inf")], ids=["nan", "inf", "-inf"])
def test_a_non_finite_probe_pauses_every_token_through_the_step(tiny, compile, bias):
    """A probe whose bias is NaN or +-inf (sigmoid(-inf) = 0 would look safe): every score is
    non-finite, every token pauses, the EMA is left as it was, and with an allowing classifier
    the answer is released only as far as the allows covered it, each a token further."""
    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=0.0)
    probe = type(probe)(config=probe.config, weight=probe.weight, bias=torch.tensor([bias]))
    classifier = FakeClassifier("allow")
    results, monitor, shown = _guarded(loaded, probe, classifier, compile=compile)
    for i, r in enumerate(results):
        summary = summarize(monitor[i])
        assert all(math.isnan(s) for s in r.scores) and all(e == -1.0 for e in r.emas)
        assert summary["pause_points"] == list(range(len(r.token_ids)))
        assert [v["covers"] for v in summary["verdicts"]] == list(range(1, len(r.token_ids) + 1))
        assert summary["status"] == "completed" and shown[i] == summary["released_text"]


def test_an_interruption_while_tokens_are_held_shows_nothing_held(tiny):
    """Ctrl-C (KeyboardInterrupt) while a check is pending: the stream stops, its request is
    cancelled, and what was shown stops before the pause point."""
    loaded = tiny("llama")

    class Interrupting(FakeClassifier):
        def submit(self, prompt, response, urgent=False, judged_chars=0):
            future = super().submit(prompt, response, urgent)
            if len(self.calls) == 2:
                raise KeyboardInterrupt
            return future

    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM
    from oc_engine.outputs import TextReleased

    llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=1, max_model_len=64),
              GuardSetup(probe=make_probe(loaded.model, bias=20.0), classifier=Interrupting("allow", delay=0.05),
                         policy=GuardConfig(refusal=REFUSAL)))
    shown, events = [], llm.stream(PROMPTS[0], CONFIG)
    with pytest.raises(KeyboardInterrupt):
        for event in events:
            if isinstance(event, TextReleased):
                shown.append(event.text)
    assert not llm.has_unfinished()  # the interrupted request was cancelled, its slot freed
    first = loaded.tokenizer.decode(list(plain_llm(loaded).generate([PROMPTS[0]], fixed(1))[0].token_ids),
                                    skip_special_tokens=True)
    assert "".join(shown) in ("", first)  # at most token 0, which an allow covered; never the pause point 1


def test_a_trace_writes_non_finite_scores_as_null_json(tiny):
    import json

    monitor = monitored(tiny("llama").tokenizer, "a", GuardConfig(refusal=REFUSAL), None, record_trace=True)
    feed(monitor, 10, float("nan"), 0.2, 0)
    (row,) = monitor.trace_rows(include_held=True)
    assert row["score"] is None and row["ema"] == 0.2 and row["flags"] & NONFINITE
    assert summarize(monitor)["status"] == "blocked"  # paused, no classifier: fail closed
    json.dumps(row, allow_nan=False)  # strict JSON, readable by any tool
