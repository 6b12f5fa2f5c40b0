"""The guard policy as properties over random probe flags and verdict timings."""

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oc_engine.engine.guard import CATCH_UPS, PAUSE, WARN, Check, GuardConfig, Refuse, Release, SequenceGuard, Stop
from oc_engine.errors import OcEngineError

REFUSAL = "REFUSED"


def simulate(config, flags, verdicts, delays):
    """Feed tokens with `flags`; answer the k-th check with verdicts[k] after delays[k] more tokens.

    Returns (output, log, guard): output is the shown stream, ("tok", i) and ("refusal", text)
    items in order; log records each token's release with the allow cover known at that time.
    """
    guard = SequenceGuard(config)
    output, allow_covers, released_with = [], [], {}
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

    for _ in range(10_000):
        due = pending is not None and (produced >= pending[1] or not guard.wants_tokens or guard.must_wait
                                       or produced == len(flags))
        if due:
            check, _ = pending
            pending = None
            verdict = verdicts[k % len(verdicts)]
            k += 1
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
    return output, released_with, guard


configs = st.builds(GuardConfig, every=st.integers(1, 3), uncertain=st.sampled_from(["final", "block"]),
                    on_failure=st.sampled_from(["block", "stop"]), final_check=st.booleans(),
                    max_held=st.integers(1, 6), refusal=st.just(REFUSAL),
                    catch_up=st.sampled_from(CATCH_UPS))
flag_lists = st.lists(st.sampled_from([0, 0, 0, WARN, WARN | PAUSE]), min_size=1, max_size=40)
verdict_lists = st.lists(st.sampled_from(["allow", "allow", "allow", "block", "uncertain", "error", "timeout"]),
                         min_size=1, max_size=12)
delay_lists = st.lists(st.integers(0, 5), min_size=1, max_size=12)


@settings(max_examples=400, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists)
def test_no_token_after_a_pause_point_is_shown_before_an_allow_covers_it(config, flags, verdicts, delays):
    output, released_with, guard = simulate(config, flags, verdicts, delays)
    shown = [i for kind, i in output if kind == "tok"]
    assert shown == list(range(len(shown))), "tokens are shown in order, each once"
    # Tokens in a held span [pause point, re-arm) need an allow that covers them.
    spans = _held_spans(guard)
    for i in shown:
        if any(start <= i < end for start, end in spans):
            assert released_with[i] > i, f"token {i} was shown before an allow verdict covered it"
    # Whatever the catch-up, a token whose pause flag counts (at the cadence) is never shown uncovered.
    for i in shown:
        if flags[i] & PAUSE and (i + 1) % config.every == 0:
            assert released_with[i] > i, f"token {i} has a pause flag and was shown uncovered"


def _held_spans(guard):
    """[start, end) from each pause point to the allow verdict that re-armed the guard; open-ended
    if none did. "wait"/"overlap" re-arm on an allow covering every token produced by then;
    "replay" re-arms at any allow's cover and judges the later tokens again (new pause points)."""
    spans, start = [], None
    replay = guard.config.catch_up == "replay"
    for event in guard.events:
        if event["event"] == "pause":
            start = event["token"]
        elif (event["event"] == "verdict" and event["verdict"] == "allow" and start is not None
              and (event["covers"] == event["produced"] or replay)):
            spans.append((start, event["covers"]))
            start = None
    if start is not None:
        spans.append((start, float("inf")))
    return spans


@settings(max_examples=400, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists)
def test_a_blocked_sequence_ends_with_exactly_the_refusal(config, flags, verdicts, delays):
    output, _, guard = simulate(config, flags, verdicts, delays)
    refusals = [i for i, (kind, _) in enumerate(output) if kind == "refusal"]
    if guard.status == "blocked":
        assert refusals == [len(output) - 1] and output[-1] == ("refusal", REFUSAL)
    else:
        assert refusals == []
    if guard.status == "completed":
        assert len(output) == len(flags), "a completed answer is shown whole"


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
    assert [e["event"] for e in guard.events] == ["pause", "verdict", "warn"]


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
                                 dict(catch_up="later"), dict(deadline_s=0)])
def test_guard_config_is_validated(bad):
    with pytest.raises(OcEngineError):
        GuardConfig(**bad)


@settings(max_examples=300, deadline=None)
@given(config=configs, flags=flag_lists, verdicts=verdict_lists, delays=delay_lists)
def test_replay_shows_what_the_blocking_design_shows(config, flags, verdicts, delays):
    """With "replay", decoding runs on while checks are pending, yet the shown stream is the one
    the blocking design (delay 0: stop at each pause until its verdict) shows when every
    verdict is allow. (That decoding never waits below max_held is tested end to end.)"""
    config = dataclasses.replace(config, catch_up="replay")
    allow = ["allow"]
    overlapped, _, _ = simulate(config, flags, allow, delays)
    blocking, _, _ = simulate(config, flags, allow, [0])
    assert overlapped == blocking


@pytest.mark.parametrize("catch_up", ["wait", "overlap"])
def test_catching_up_after_an_allow(catch_up):
    """An allow that leaves tokens uncovered asks one follow-up; "wait" pauses decoding for it."""
    guard = SequenceGuard(GuardConfig(catch_up=catch_up, max_held=64))
    (check,) = guard.on_token(PAUSE)
    assert guard.on_token(0) == [] and guard.on_token(0) == []  # held while the check runs
    release, follow_up = guard.on_verdict(check, "allow")
    assert release == Release(0, 1) and follow_up == Check(covers=3)
    assert guard.must_wait is (catch_up == "wait")
    if catch_up == "overlap":
        assert guard.on_token(0) == []  # still held: the follow-up covers only 3 tokens
    assert guard.on_verdict(follow_up, "allow")[0] == Release(1, 3)
    assert not guard.must_wait
    assert guard.state == ("streaming" if catch_up == "wait" else "held")


def test_replay_rearms_at_the_cover_and_pauses_again_on_a_flag():
    """An allow covering 1 of 4 tokens: the quiet next token is released, the flagged one is a
    new pause point, and its check covers every token made so far; decoding never waits."""
    guard = SequenceGuard(GuardConfig(catch_up="replay", max_held=64))
    (check,) = guard.on_token(PAUSE)
    assert [guard.on_token(f) for f in (0, PAUSE, 0)] == [[], [], []]
    assert not guard.must_wait
    assert guard.on_verdict(check, "allow") == [Release(0, 1), Release(1, 2), Check(covers=4)]
    assert guard.pause_points == [0, 2] and guard.state == "held" and not guard.must_wait
    assert guard.on_verdict(Check(covers=4), "allow") == [Release(2, 4)]
    assert guard.state == "streaming"
    assert guard.on_token(0) == [Release(4, 5)]
