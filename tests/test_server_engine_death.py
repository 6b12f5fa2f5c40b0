"""A dead engine is a loud server: requests in flight get an error in OpenAI's format, /health
says why, and `oc-engine serve` exits non-zero (so a supervisor restarts it). Errors that are
no request's fault are OpenAI-format 500s, audited; a chat template's own refusal is a 400."""

import copy
import dataclasses
import json
import time

import httpx
import pytest

from server_helpers import ROOT, ServerProcess, thread_server
from serve_with_crashing_step import CRASH_MAX_TOKENS

BASE_ARGS = ["--dtype", "float32", "--no-compile", "--no-guard"]
MESSAGES = [{"role": "user", "content": "Count to one thousand."}]


def test_a_dead_engine_errors_the_requests_in_flight_and_the_server_exits_1(tmp_path):
    audit = tmp_path / "audit.jsonl"
    server = ServerProcess([*BASE_ARGS, "--audit-log", str(audit)], tmp_path / "server.log",
                           launcher=(str(ROOT / "tests" / "serve_with_crashing_step.py"),)).wait_ready()
    try:
        with httpx.Client(timeout=60) as http:
            body = {"messages": MESSAGES, "stream": True, "max_tokens": 1000, "ignore_eos": True}
            with http.stream("POST", f"{server.base}/v1/chat/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(lines).startswith("data: ")
                crash = http.post(f"{server.base}/v1/chat/completions",
                                  json={"messages": MESSAGES, "max_tokens": CRASH_MAX_TOKENS})
                rest = [line[6:] for line in lines if line.startswith("data: ")]
        assert crash.status_code == 503
        assert "injected: the step failed" in crash.json()["error"]["message"]
        assert rest[-1] == "[DONE]"
        error = json.loads(rest[-2])["error"]
        assert error["type"] == "service_unavailable" and "the engine stopped" in error["message"]
        assert server.proc.wait(30) == 1
    finally:
        server.stop()
    log = server.log.read_text()
    assert "the engine stopped: RuntimeError('injected: the step failed')" in log
    audited = [json.loads(line) for line in audit.read_text().splitlines()]
    assert sorted(r["status"] for r in audited if r["event"] == "error") == [503, 503]


@pytest.fixture(scope="module")
def crashing(tiny, tmp_path_factory):
    """An in-process server (nothing stops it) whose engine fails on a request of
    max_tokens=77, and whose chat template refuses two user turns in a row."""
    from oc_engine.config import EngineConfig
    from oc_engine.llm import LLM
    from oc_engine.server import ServerConfig

    shared = tiny("llama")
    loaded = dataclasses.replace(shared, tokenizer=copy.deepcopy(shared.tokenizer))  # its own chat template
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"

    def make_llm():
        llm = LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128))
        llm.tokenizer.chat_template = (
            "{% for m in messages %}{% if loop.index0 > 0 and m['role'] == messages[loop.index0 - 1]['role'] %}"
            "{{ raise_exception('Conversation roles must alternate') }}{% endif %}{{ m['content'] }} {% endfor %}")
        step = llm.step

        def crashing_step():
            if any(seq.params.max_tokens == CRASH_MAX_TOKENS for seq in llm.engine.requests.values()):
                raise RuntimeError("injected: the step failed")
            return step()
        llm.step = crashing_step
        return llm

    with thread_server(ServerConfig(model_name="tiny", audit_log=str(audit)), make_llm) as (base, app):
        yield base, app, audit


def test_a_chat_templates_refusal_is_a_400_in_openais_format(crashing):
    base, _, audit = crashing
    response = httpx.post(f"{base}/v1/chat/completions", timeout=30, json={
        "messages": [{"role": "user", "content": "w1"}, {"role": "user", "content": "w2"}], "max_tokens": 2})
    assert response.status_code == 400
    assert "Conversation roles must alternate" in response.json()["error"]["message"]
    last = json.loads(audit.read_text().splitlines()[-1])
    assert last["event"] == "error" and last["status"] == 400


def test_an_unexpected_error_is_a_500_in_openais_format_and_audited(crashing):
    base, app, audit = crashing
    state = app.state.oc
    broken = state.llm.prepare_request
    state.llm.prepare_request = lambda *a, **k: 1 / 0  # a bug while preparing, not the request's fault
    try:
        response = httpx.post(f"{base}/v1/completions", timeout=30, json={"prompt": "w1 w2", "max_tokens": 2})
    finally:
        state.llm.prepare_request = broken
    assert response.status_code == 500
    body = response.json()["error"]
    assert body["type"] == "server_error" and "ZeroDivisionError" in body["message"]
    assert response.headers["x-request-id"]
    last = json.loads(audit.read_text().splitlines()[-1])
    assert last == {**last, "event": "error", "status": 500, "request_id": response.headers["x-request-id"]}


def test_health_says_why_the_engine_stopped(crashing):
    base, app, _ = crashing
    response = httpx.post(f"{base}/v1/completions", timeout=30, json={"prompt": "w1", "max_tokens": CRASH_MAX_TOKENS})
    assert response.status_code == 503
    deadline = time.monotonic() + 10
    while (health := httpx.get(f"{base}/health", timeout=5)).status_code == 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert health.status_code == 503
    assert health.json() == {"status": "unavailable",
                             "reason": "the engine stopped: RuntimeError('injected: the step failed')"}
    later = httpx.post(f"{base}/v1/completions", timeout=30, json={"prompt": "w1", "max_tokens": 2})
    assert later.status_code == 503 and "the engine stopped" in later.json()["error"]["message"]
