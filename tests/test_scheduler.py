"""The scheduler and the sequence state are plain Python: tested here without torch."""

import subprocess
import sys

import pytest

from oc_engine.engine.scheduler import Scheduler
from oc_engine.engine.sequence import RUNNING, WAITING, Sequence
from oc_engine.params import SamplingParams


class CharTokenizer:
    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(96 + i) for i in ids)


def _seq(name, max_tokens=4, **params):
    from oc_engine.engine.text_stream import TextStream

    p = SamplingParams(max_tokens=max_tokens, **params)
    return Sequence(request_id=name, prompt_ids=[1, 2], params=p, key=0, limit=max_tokens,
                    stream=TextStream(CharTokenizer(), p.stop))


def test_importing_the_scheduler_and_sequence_loads_no_torch():
    code = ("import sys; import oc_engine, oc_engine.engine.scheduler, oc_engine.engine.sequence, oc_engine.params; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_first_come_first_served_into_free_slots():
    scheduler = Scheduler(2)
    a, b, c = _seq("a"), _seq("b"), _seq("c")
    for s in (a, b, c):
        scheduler.add(s)
    assert scheduler.admit() == [a, b] and (a.slot, b.slot) == (0, 1) and a.status == RUNNING
    assert scheduler.admit() == [] and c.status == WAITING
    scheduler.free(a)  # a finished: its slot goes to the next waiting request at once
    assert a.slot is None and scheduler.admit() == [c] and c.slot == 0
    assert scheduler.free_slots == 0


def test_a_cancelled_waiting_request_never_takes_a_slot():
    scheduler = Scheduler(1)
    a, b = _seq("a"), _seq("b")
    scheduler.add(a)
    scheduler.add(b)
    assert scheduler.remove_waiting(b) and not scheduler.remove_waiting(b)
    assert scheduler.admit() == [a]
    scheduler.free(a)
    assert scheduler.admit() == []


def test_a_sequence_ends_on_eos_stop_or_length():
    s = _seq("a", max_tokens=3)
    assert s.append_token(1, is_eos=False) == "a" and s.finish_reason is None
    s.append_token(2, is_eos=False)
    s.append_token(3, is_eos=False)
    assert s.finish_reason == "length" and s.text == "abc"
    e = _seq("e")
    e.append_token(5, is_eos=True)
    assert e.finish_reason == "eos"
    ignoring = _seq("i", ignore_eos=True)
    ignoring.append_token(5, is_eos=True)
    assert ignoring.finish_reason is None
    stopped = _seq("s", max_tokens=9, stop=("cd",))
    for t in (1, 2, 3, 4, 5):
        stopped.append_token(t, is_eos=False)
        if stopped.decoding_done:
            break
    assert stopped.finish_reason == "stop" and stopped.text == "ab"


@pytest.mark.parametrize("bad", [dict(max_tokens=0), dict(max_tokens=True), dict(temperature=-1.0),
                                 dict(temperature=float("inf")), dict(top_k=0), dict(top_p=0.0), dict(stop=("",)),
                                 dict(seed=-1), dict(ignore_eos="yes")])
def test_sampling_params_are_validated(bad):
    from oc_engine.errors import OcEngineError

    with pytest.raises(OcEngineError):
        SamplingParams(**bad)
