"""The server keeps the guard's promise when the classifier misbehaves (the fault suite, over HTTP).

An in-process server over the tiny Llama, a probe that pauses on some tokens, and a classifier
whose behaviour for a request is named by the prompt's first word: allow, block, uncertain,
or a fault (raises on submit or in its worker, hangs, answers NaN, not a dict, an unknown
verdict, allows after its deadline). Property: whatever the prompt, the fault and the answer's
length, the streamed text is exactly the first `released_tokens` of the model's own answer
(then the refusal, if blocked), no text at or after a pause point that a valid allow did not
cover, `finish_reason` content_filter when the guard ended it, and the audit log names every
fail-closed event."""

import concurrent.futures as cf
import json
import math
import time

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oc_engine.guard.policy import GuardConfig
from oc_engine.server import ServerConfig
from probe_helpers import fixed, make_probe, plain_llm
from server_helpers import metric, thread_server

DEADLINE = 0.3
KEY = "sk-test-secret"
KINDS = ("allow", "block", "uncertain", "raise", "raise_on_submit", "hang", "nan", "not_a_dict", "unknown_verdict",
         "late_allow")
FAILURES = {"raise": "error", "raise_on_submit": "error", "nan": "error", "not_a_dict": "error",
            "unknown_verdict": "error", "hang": "timeout", "late_allow": "timeout"}
WORD = {kind: f"w{40 + i}" for i, kind in enumerate(KINDS)}  # words the tiny tokenizer keeps whole
KIND_OF = {word: kind for kind, word in WORD.items()}


class ByPrompt:
    """Answers every check of a request as its prompt's first word says."""

    def __init__(self):
        self.pool = cf.ThreadPoolExecutor(max_workers=4)

    def submit(self, prompt, response, urgent=False, judged_chars=0):
        kind = KIND_OF[prompt.split()[0]]
        if kind == "raise_on_submit":
            raise RuntimeError("injected: submit failed")
        if kind == "hang":
            return cf.Future()
        return self.pool.submit(self._answer, kind)

    @staticmethod
    def _answer(kind):
        if kind == "raise":
            raise RuntimeError("injected: worker failed")
        if kind == "late_allow":
            time.sleep(DEADLINE * 1.5)
            return {"verdict": "allow", "p_unsafe": 0.0}
        if kind == "nan":
            return {"verdict": "allow", "p_unsafe": math.nan}
        if kind == "not_a_dict":
            return "allow"
        if kind == "unknown_verdict":
            return {"verdict": "maybe"}
        return {"verdict": kind, "p_unsafe": 0.9 if kind == "block" else 0.1}

    def close(self):
        self.pool.shutdown(wait=False, cancel_futures=True)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    config = ServerConfig(model_name="tiny", api_key=KEY, audit_log=str(audit), max_waiting=8,
                          allow_guard_override=True,  # lets a test give a hanging check a long deadline
                          guard_details=True)  # the tests read each answer's pauses and verdicts
    guard = GuardConfig(every=1, deadline_s=DEADLINE, max_held=8, refusal="REFUSED")
    classifier = ByPrompt()

    # Raw scores (alpha 1) around the pause threshold: some tokens pause, at places that vary.
    probe = make_probe(loaded.model, bias=1.0, alpha=1.0, warn=0.6, pause=0.715)

    def make_llm():
        return LLM(loaded, EngineConfig(compile=False, max_num_seqs=4, max_model_len=128),
                   GuardSetup(probe=probe, classifier=classifier, policy=guard))

    reference = plain_llm(loaded, max_num_seqs=1)
    with thread_server(config, make_llm) as (base, app):
        client = openai.OpenAI(base_url=f"{base}/v1", api_key=KEY, max_retries=0)
        yield base, client, reference, audit
    classifier.close()


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(KINDS), words=st.lists(st.integers(5, 500), min_size=1, max_size=6),
       max_tokens=st.integers(1, 24))
def test_a_stream_shows_only_what_a_valid_allow_covered(server, kind, words, max_tokens):
    base, client, reference, _ = server
    prompt = " ".join([WORD[kind], *(f"w{w}" for w in words)])
    stream = client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                       stream=True, extra_body={"ignore_eos": True})
    text, finish, report = "", None, None
    for chunk in stream:
        assert finish is None, "nothing follows the finish chunk"
        text += chunk.choices[0].text
        finish = chunk.choices[0].finish_reason
        report = (chunk.model_extra or {}).get("oc_engine", report)
    ids = reference.tokenizer(prompt)["input_ids"]
    (own,) = reference.generate([ids], fixed(max_tokens))  # the model's answer, unguarded
    released = report["released_tokens"]
    expected = reference.tokenizer.decode(list(own.token_ids[:released]))
    pauses = report["pause_points"]
    if report["status"] == "completed":
        assert finish == "length" and text == own.text and released == max_tokens
    else:
        assert finish == "content_filter"
        assert text == expected + ("\nREFUSED" if expected else "REFUSED")
        assert pauses and released <= pauses[-1]  # the last pause's check never allowed
    if kind in FAILURES and pauses:
        assert released == pauses[0], "a failed check shows nothing from its pause point on"
        assert report["verdicts"][0]["verdict"] == FAILURES[kind]
    if kind == "block" and pauses:
        assert report["status"] == "blocked" and released == pauses[0]


@pytest.mark.parametrize("kind", sorted(FAILURES))
def test_each_fault_is_counted_and_audited_as_fail_closed(server, kind):
    base, client, _, audit = server
    reason = FAILURES[kind]
    before = metric(base, "oc_engine_guard_fail_closed_total", key=KEY, reason=reason)
    prompt = f"{WORD[kind]} w7 w8 w9"
    response = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0,
                                         extra_body={"ignore_eos": True, "oc_engine": {"every": 1}})
    report = response.model_extra["oc_engine"]
    assert response.choices[0].finish_reason == "content_filter"
    assert response.choices[0].text.endswith("REFUSED") and report["status"] == "blocked"
    assert report["verdicts"][-1]["verdict"] == reason
    assert metric(base, "oc_engine_guard_fail_closed_total", key=KEY, reason=reason) == before + 1
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    mine = [line for line in lines if line["request_id"] == response.id]
    events = [line["event"] for line in mine]
    assert events[0] == "request" and events[-1] == "end"
    assert "fail_closed" in events and "block" in events and "verdict" in events
    assert [line.get("prompt") for line in mine] == [prompt] + [None] * (len(mine) - 1), "the prompt once"
    failed = next(line for line in mine if line["event"] == "fail_closed")
    assert failed["reason"] == reason
    assert failed["held_text"], "the audit log keeps the text the guard held back"
    assert KEY not in audit.read_text()


def test_a_client_that_leaves_cancels_its_request_while_a_check_hangs(server):
    """The engine thread is blocked on the verdict (the only sequence waits for it); the
    disconnect still cancels the request at once, and a new request is served meanwhile."""
    base, client, _, _ = server
    cancelled = metric(base, "oc_engine_requests_total", key=KEY, outcome="cancelled")
    body = {"model": "tiny", "prompt": f"{WORD['hang']} w7 w8", "max_tokens": 24, "ignore_eos": True,
            "oc_engine": {"deadline_s": 120.0, "input_check": True}}  # the input check hangs: all is held
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{base}/v1/completions", json=body, headers={"authorization": f"Bearer {KEY}"},
                   timeout=httpx.Timeout(10.0, read=1.0))
    started = time.monotonic()
    while metric(base, "oc_engine_requests_total", key=KEY, outcome="cancelled") < cancelled + 1:
        assert time.monotonic() - started < 10, "the request was not cancelled"
        time.sleep(0.05)
    assert metric(base, "oc_engine_requests_running", key=KEY) == 0


def test_a_new_request_is_admitted_while_every_running_one_waits(server):
    base, client, _, _ = server
    body = {"model": "tiny", "prompt": f"{WORD['hang']} w7 w8", "max_tokens": 24, "ignore_eos": True,
            "stream": True, "oc_engine": {"deadline_s": 120.0, "input_check": True}}
    with httpx.Client(timeout=30) as http:
        request = http.build_request("POST", f"{base}/v1/completions", json=body,
                                     headers={"authorization": f"Bearer {KEY}"})
        hanging = http.send(request, stream=True)  # its input check hangs; at max_held the engine blocks on it
        hanging_lines = hanging.iter_lines()  # kept: a discarded iterator closes the connection
        next(hanging_lines)
        time.sleep(0.5)
        started = time.monotonic()
        quick = client.completions.create(model="tiny", prompt=f"{WORD['allow']} w9", max_tokens=4, temperature=0)
        assert quick.choices[0].finish_reason in ("length", "stop") and time.monotonic() - started < 10
        hanging.close()
