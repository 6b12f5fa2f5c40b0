"""The guard policy as properties over random probe flags and verdict timings."""

import dataclasses
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oc_engine.errors import OcEngineError
from oc_engine.guard.policy import (NONFINITE, PAUSE, WARN, Check, GuardConfig, Refuse, Release, SequenceGuard, Stop,
                                    token_flags)

REFUSAL = "REFUSED"


def simulate(config, flags, verdicts, delays, judge=None, marks=None):
    """Feed tokens with `flags`; answer the k-th check after delays[k] more tokens (a delay is how
    long its verdict takes, counted in tokens decoded meanwhile), with verdicts[k], or with
    judge(check) when given (a classifier whose answer depends only on what it is shown).

    Returns (output, released_with, guard, checks): output is the shown stream, ("tok", i) and
    ("refusal", text) items in order; released_with maps each shown token to the largest allow
    cover known when it was shown; checks lists every check asked, with its verdict; `marks`,
    if given, gets the output's length when each verdict is applied.
    """
    guard = SequenceGuard(config)
    output, allow_covers, released_with, checks = [], [], {}, []
    pending, k = None, 0
    produced = 0

    def apply(actions):
        nonlocal pending
        for action in actions:
            if isinstance(action, Release):
                for i in range(action.start, action.stop):
                    output.append(("tok", i))
                    released_with[i] = max(allow_covers, default=0)
            elif isinstance(action, Check):
                assert pending is None, "at most one check in flight"
                pending = (action, produced + delays[k % len(delays)])
            elif isinstance(action, Refuse):
                output.append(("refusal", action.text))

    apply(guard.start())  # the input check, when configured, before the first token
    for _ in range(10_000):
        due = pending is not None and (produced >= pending[1] or not guard.wants_tokens or guard.must_wait
                                       or produced == len(flags))
        if due:
            check, _ = pending
            pending = None
            verdict = judge(check) if judge else verdicts[k % len(verdicts)]
            k += 1
            checks.append((check, verdict))
            if marks is not None:
                marks.append(len(output))
            if verdict == "allow":
                allow_covers.append(check.covers)
            apply(guard.on_verdict(check, verdict))
        elif guard.wants_tokens and not guard.must_wait and produced < len(flags):
            produced += 1
            apply(guard.on_token(flags[produced - 1]))
            if produced == len(flags):
                apply(guard.on_finish())
        else:
            break
    assert pending is None, "a check was left unanswered"
    return output, released_with, guard, checks


configs = st.builds(GuardConfig, every=st.integers(1, 3), uncertain=st.sampled_from(["final", "block"]),
                    on_failure=st.sampled_from(["block", "stop"]), final_check=st.booleans(),
                    hold_all=st.booleans(), input_check=st.booleans(), max_held=st.integers(1, 6),
                    refusal=st.just(REFUSAL))
flag_lists = st.lists(st.sampled_from([0, 0, 0, WARN, WARN | PAUSE, WARN | PAUSE | NONFINITE, NONFINITE]),
                      min_size=1, max_size=40)
verdict_lists = st.lists(st.sampled_from(["allow", "allow", "allow", "block", "uncertain", "error", "timeout"]),
                         min_size=1, max_size=12)
delay_lists = st.lists(st.integers(0, 5), min_size=1, max_size=12)


@settings(max_examples=400, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists)
def test_no_token_after_a_pause_point_is_shown_before_an_allow_covers_it(config, flags, verdicts, delays):
    output, released_with, guard, _ = simulate(config, flags, verdicts, delays)
    shown = [i for kind, i in output if kind == "tok"]
    assert shown == list(range(len(shown))), "tokens are shown in order, each once"
    # Tokens in a held span [pause point, the cover of the allow that re-armed) need that allow.
    spans = _held_spans(guard)
    for i in shown:
        if any(start <= i < end for start, end in spans):
            assert released_with[i] > i, f"token {i} was shown before an allow verdict covered it"
    # A token whose pause flag counts (at the cadence), or whose score is not finite (any
    # token), is never shown uncovered.
    for i in shown:
        if flags[i] & NONFINITE or (flags[i] & PAUSE and (i + 1) % config.every == 0):
            assert released_with[i] > i, f"token {i} has a pause flag and was shown uncovered"


def _held_spans(guard):
    """[start, end) from each pause point to the cover of the allow verdict that re-armed the
    guard (every allow re-arms at its cover; later tokens are judged again); open-ended if none did."""
    spans, start = [], None
    for event in guard.events:
        if event["event"] == "pause":
            start = event["token"]
        elif event["event"] == "verdict" and event["verdict"] == "allow" and start is not None:
            spans.append((start, event["covers"]))
            start = None
    if start is not None:
        spans.append((start, float("inf")))
    return spans


@settings(max_examples=400, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists)
def test_a_blocked_sequence_ends_with_exactly_the_refusal(config, flags, verdicts, delays):
    output, _, guard, _ = simulate(config, flags, verdicts, delays)
    refusals = [i for i, (kind, _) in enumerate(output) if kind == "refusal"]
    if guard.status == "blocked":
        assert refusals == [len(output) - 1] and output[-1] == ("refusal", REFUSAL)
    else:
        assert refusals == []
    if guard.status == "completed":
        # Shown whole: every token made (holding for the final check, max_held ends the answer early).
        assert len(output) == guard.num_tokens, "a completed answer is shown whole"
        assert guard.num_tokens == len(flags) or any(e["event"] == "cap" for e in guard.events)


@settings(max_examples=200, deadline=None)
@given(config=configs, runs=st.lists(st.tuples(flag_lists, verdict_lists, delay_lists), min_size=2, max_size=4))
def test_sequences_of_a_batch_do_not_affect_each_other(config, runs):
    """Guards are per sequence: interleaving several changes nothing for any of them."""
    alone = [simulate(config, *run)[0] for run in runs]
    again = [simulate(config, *run)[0] for run in reversed(runs)][::-1]
    assert alone == again


def test_fail_closed_when_the_classifier_errors():
    guard = SequenceGuard(GuardConfig(on_failure="stop"))
    assert guard.on_token(0) == [Release(0, 1)]
    (check,) = guard.on_token(PAUSE)
    assert guard.on_token(0) == []  # held
    assert guard.on_verdict(check, "error") == [Stop("classifier error")]
    assert guard.released == 1 and guard.status == "held"


def test_allow_releases_and_rearms_and_warn_streams():
    guard = SequenceGuard(GuardConfig())
    (check,) = guard.on_token(PAUSE | WARN)
    assert guard.on_verdict(check, "allow") == [Release(0, 1)]
    assert guard.state == "streaming"
    assert guard.on_token(WARN) == [Release(1, 2)]
    assert [e["event"] for e in guard.events] == ["pause", "verdict", "rearm", "warn"]


def test_block_discards_held_tokens_and_refuses():
    guard = SequenceGuard(GuardConfig(refusal=REFUSAL))
    guard.on_token(0)
    (check,) = guard.on_token(PAUSE)
    guard.on_token(0)
    assert guard.on_verdict(check, "block") == [Refuse(REFUSAL), Stop("classifier verdict: block")]
    assert guard.released == 1 and guard.status == "blocked" and not guard.wants_tokens


def test_no_classifier_fails_closed():
    guard = SequenceGuard(GuardConfig(refusal=REFUSAL))
    guard.on_token(PAUSE)
    assert guard.on_no_classifier() == [Refuse(REFUSAL), Stop("no classifier configured")]


def test_final_check_judges_the_whole_answer():
    guard = SequenceGuard(GuardConfig(final_check=True))
    guard.on_token(0)
    (check,) = guard.on_finish()
    assert check == Check(covers=1, final=True)
    assert guard.on_verdict(check, "allow") == []  # already shown; nothing held
    assert guard.status == "completed"


@pytest.mark.parametrize("bad", [dict(every=0), dict(uncertain="maybe"), dict(on_failure="x"), dict(max_held=0),
                                 dict(deadline_s=0), dict(deadline_s=float("nan")),
                                 dict(deadline_s=1e300), dict(every=1.5), dict(max_held=True), dict(refusal=None),
                                 dict(final_check="no"), dict(input_check=None), dict(input_check="yes")])
def test_guard_config_is_validated(bad):
    with pytest.raises(OcEngineError):
        GuardConfig(**bad)


def _judge_by_input(verdicts):
    """A deterministic classifier: its verdict depends only on the check's input (how many
    tokens it is shown, and whether it is the final check)."""
    return lambda check: verdicts[(check.covers * 7 + check.final) % len(verdicts)]


@settings(max_examples=500, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists)
def test_decisions_do_not_depend_on_verdict_latency(config, flags, verdicts, delays):
    """However long each verdict takes (delays, in tokens decoded meanwhile, up to max_held),
    the checks asked (what each is shown), their verdicts, the shown text and the final
    status are those of the blocking design (delay 0: decoding stops at each pause until its
    verdict). So a faster or slower machine, or a GPU, meets the same decisions."""
    judge = _judge_by_input(verdicts)
    overlapped, _, guard, checks = simulate(config, flags, None, delays, judge=judge)
    blocking, _, blocking_guard, blocking_checks = simulate(config, flags, None, [0], judge=judge)
    assert checks == blocking_checks
    assert overlapped == blocking
    assert (guard.status, guard.reason, guard.pause_points) == \
           (blocking_guard.status, blocking_guard.reason, blocking_guard.pause_points)


@settings(max_examples=300, deadline=None)
@given(config=configs, flags=flag_lists, delays=delay_lists)
def test_each_check_covers_the_answer_up_to_its_pause_point(config, flags, delays):
    _, _, guard, checks = simulate(config, flags, ["allow"], delays)
    for check, _ in checks:
        if check.input:
            assert check.covers == 0 and checks[0][0] is check
        elif check.final:
            assert check.covers == guard.num_tokens
        else:
            assert check.covers - 1 in guard.pause_points


def test_a_non_finite_score_pauses_whatever_the_cadence():
    guard = SequenceGuard(GuardConfig(every=4))
    assert guard.on_token(PAUSE | WARN) == [Release(0, 1)]  # off the cadence: streams
    assert guard.on_token(token_flags(0, float("nan"), 0.1)) == [Check(covers=2)]
    assert guard.events[-1] == {"event": "pause", "token": 1, "nonfinite": True}


@pytest.mark.parametrize("score,ema", [(float("nan"), 0.2), (0.3, float("nan")), (float("inf"), 0.1),
                                       (0.1, float("-inf"))])
def test_token_flags_count_non_finite_numbers_as_a_pause(score, ema):
    assert token_flags(0, score, ema) == WARN | PAUSE | NONFINITE
    assert token_flags(0, 0.1, 0.2) == 0 and token_flags(WARN, None, None) == WARN


def test_replay_rearms_at_the_cover_and_pauses_again_on_a_flag():
    """An allow covering 1 of 4 tokens: the quiet next token is released, the flagged one is a
    new pause point, and its check covers the answer up to it (not every token made by then,
    which would depend on how fast decoding ran); decoding never waits."""
    guard = SequenceGuard(GuardConfig(max_held=64))
    (check,) = guard.on_token(PAUSE)
    assert [guard.on_token(f) for f in (0, PAUSE, 0)] == [[], [], []]
    assert not guard.must_wait
    assert guard.on_verdict(check, "allow") == [Release(0, 1), Release(1, 2), Check(covers=3)]
    assert guard.pause_points == [0, 2] and guard.state == "held" and not guard.must_wait
    assert guard.on_verdict(Check(covers=3), "allow") == [Release(2, 3), Release(3, 4)]
    assert guard.state == "streaming"
    assert guard.on_token(0) == [Release(4, 5)]


def test_final_check_after_a_partial_allow_judges_the_whole_answer():
    guard = SequenceGuard(GuardConfig(final_check=True))
    (check,) = guard.on_token(PAUSE)
    guard.on_token(0)
    assert guard.on_finish() == []  # the check in flight decides first
    assert guard.on_verdict(check, "allow") == [Release(0, 1), Release(1, 2), Check(covers=2, final=True)]
    assert guard.on_verdict(Check(covers=2, final=True), "allow") == []
    assert guard.status == "completed"


@settings(max_examples=400, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists,
       first=st.sampled_from(["allow", "block", "uncertain", "error", "timeout"]))
def test_the_input_check_holds_every_token_until_its_verdict(config, flags, verdicts, delays, first):
    """The prompt is judged first (the answer empty); no token is shown before that verdict; a
    block, error or timeout shows no model token at all; after an allow the answer is exactly
    what it would have been without the input check, however long the verdict took."""
    config = dataclasses.replace(config, input_check=True)
    later = _judge_by_input(verdicts)
    marks = []
    output, _, guard, checks = simulate(config, flags, None, delays,
                                        judge=lambda c: first if c.input else later(c), marks=marks)
    assert checks[0][0] == Check(covers=0, input=True) and marks[0] == 0
    assert sum(check.input for check, _ in checks) == 1
    if first in ("block", "error", "timeout") or (first == "uncertain" and config.uncertain == "block"):
        assert not any(kind == "tok" for kind, _ in output)
        assert guard.status in ("blocked", "held") and guard.pause_points == []
    elif first == "allow":
        plain = simulate(dataclasses.replace(config, input_check=False), flags, None, delays, judge=later)
        assert output == plain[0] and [c for c in checks[1:]] == plain[3]
    elif guard.status == "completed":  # uncertain: the answer streams, and its final check is due
        assert checks[-1][0].final or guard.allowed == guard.num_tokens


def test_final_check_none_resolves_per_request():
    auto = GuardConfig()
    assert auto.final_check is None and auto.hold_all is None
    whole = auto.for_request(streaming=False)
    assert whole.final_check is True and whole.hold_all is True
    streamed = auto.for_request(streaming=True)
    assert streamed.final_check is False and streamed.hold_all is False
    no_classifier = auto.for_request(streaming=False, has_classifier=False)
    assert no_classifier.final_check is False and no_classifier.hold_all is False
    assert GuardConfig(final_check=False).for_request(streaming=False).final_check is False


@settings(max_examples=400, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists)
def test_hold_all_shows_nothing_before_the_answer_is_done(config, flags, verdicts, delays):
    """What a non-streaming call gets: a blocked or failed answer shows only the refusal (or
    nothing); a completed one shows every token at once, after its last verdict."""
    config = dataclasses.replace(config, hold_all=True)
    marks = []
    output, _, guard, checks = simulate(config, flags, None, delays, judge=_judge_by_input(verdicts), marks=marks)
    tokens = [i for kind, i in output if kind == "tok"]
    if guard.status != "completed":
        assert tokens == []
    else:
        assert tokens == list(range(guard.num_tokens))
        assert all(mark == 0 for mark in marks), "every verdict came before anything was shown"
    plain, _, plain_guard, plain_checks = simulate(dataclasses.replace(config, hold_all=False), flags, None, delays,
                                                   judge=_judge_by_input(verdicts))
    assert (guard.status, checks) == (plain_guard.status, plain_checks), "holding changes what is shown, not when"
