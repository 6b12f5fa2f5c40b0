"""What a client learns of an answer it was not shown, through a started server and raw HTTP.

Without `--guard-details`, a blocked answer's response depends only on the text that was shown
and the fact of the block, not on how much was withheld: usage counts the tokens shown, and
no pause point, verdict, score or timing reaches the client. (The wifi case: the same blocked
answer reported 16 completion tokens, and 10 with `"stop": ["steal"]`, which told where
"steal" sat in text never shown.) Stop strings change nothing of that: a stop string found in
held text ends the answer there, and the guard then judges the answer as it ends (what the
user asked for), so all a client sees is either text the classifier allowed or the refusal."""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oc_engine.server import ServerConfig
from probe_helpers import FakeClassifier, make_probe
from server_helpers import sse_events, thread_server

@pytest.fixture(scope="module")
def server(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    # The probe never pauses, so the only check is the final one, over the whole answer, which
    # the classifier blocks: every answer is generated to its end, however long, then withheld.
    probe = make_probe(loaded.model, bias=-20.0)

    def make_llm():
        return LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128),
                   GuardSetup(probe=probe, classifier=FakeClassifier("block"),
                              policy=GuardConfig(refusal="REFUSED")))

    with thread_server(ServerConfig(model_name="tiny"), make_llm) as (base, _):
        yield base


def normalized(body: dict) -> dict:
    return {k: v for k, v in body.items() if k not in ("id", "created")}


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_tokens=st.integers(3, 24),
       stop=st.lists(st.sampled_from(["w", "w1", " w", "1", "2 w", "w9", "zz"]), max_size=3))
def test_a_blocked_answer_reads_the_same_however_much_was_withheld(server, max_tokens, stop):
    base = server
    baseline = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "w5 w6 w7", "temperature": 0, "max_tokens": 2, "ignore_eos": True}).json()
    assert baseline["choices"][0]["finish_reason"] == "content_filter"
    assert baseline["oc_engine"] == {"guarded": True, "released_tokens": baseline["usage"]["completion_tokens"],
                                     "status": "blocked", "refusal": "REFUSED"}
    other = httpx.post(f"{base}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": "w5 w6 w7", "temperature": 0, "max_tokens": max_tokens,
        "ignore_eos": True, "stop": stop}).json()
    assert normalized(other) == normalized(baseline)


def test_a_stream_sends_no_pause_or_verdict_without_guard_details(server):
    with httpx.stream("POST", f"{server}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": "w5 w6 w7", "temperature": 0, "max_tokens": 12, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True},
            "oc_engine": {"final_check": True}}) as response:  # held to the end, then blocked
        events = sse_events(response)
    chunks = [e for e in events if e != "[DONE]"]
    assert not [c for c in chunks if "event" in (c.get("oc_engine") or {})]
    final = next(c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"])
    assert final["choices"][0]["finish_reason"] == "content_filter"
    assert set(final["oc_engine"]) == {"guarded", "released_tokens", "status", "refusal"}
    assert chunks[-1]["usage"]["completion_tokens"] == final["oc_engine"]["released_tokens"]
