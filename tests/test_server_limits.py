"""The operator's limits, through a started server and raw HTTP: each refusal is OpenAI's error
JSON before any templating or tokenization, and preparing a request (templating, tokenizing)
runs off the event loop, so /health answers while a long prompt is being prepared."""

import threading

import httpx
import pytest

from oc_engine.server import ServerConfig
from server_helpers import thread_server

LIMITS = dict(max_body_bytes=4096, max_messages=3, max_message_chars=200, max_stop_chars=8, max_tokens_limit=6)


@pytest.fixture(scope="module")
def server(tiny):
    from oc_engine.config import UNGUARDED, EngineConfig
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    built = {}

    def make_llm():
        built["llm"] = LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128), UNGUARDED)
        return built["llm"]

    try:
        with thread_server(ServerConfig(model_name="tiny", **LIMITS), make_llm) as (base, _):
            yield base, built["llm"]
    finally:
        loaded.tokenizer.chat_template = None


def chat(base, messages, **body):
    return httpx.post(f"{base}/v1/chat/completions", timeout=60,
                      json={"model": "tiny", "messages": messages, "max_tokens": 2, **body})


@pytest.mark.parametrize("body, status, code", [
    ({"messages": [{"role": "user", "content": "w5"}] * 4}, 400, "too_many_messages"),
    ({"messages": [{"role": "user", "content": "w5 " * 100}]}, 400, "message_too_long"),
    ({"messages": [{"role": "user", "content": "w5"}], "stop": ["123456789"]}, 400, "stop_too_long"),
    ({"messages": [{"role": "user", "content": "w5"}], "user": "x" * 5000}, 413, "request_too_large"),
    ({"messages": [{"role": "user", "content": "w5"}], "max_tokens": 7}, 400, "max_tokens_too_large"),
])
def test_past_a_limit_is_an_openai_error_before_any_work(server, body, status, code):
    base, llm = server
    body = {"max_tokens": 2, **body}
    calls = []
    original = llm.prepare_request
    llm.prepare_request = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        response = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={"model": "tiny", **body})
    finally:
        del llm.prepare_request
    assert response.status_code == status and response.json()["error"]["code"] == code
    assert not calls  # refused before templating or tokenization
    assert chat(base, [{"role": "user", "content": "w5 w6"}]).status_code == 200  # and it keeps serving


def test_health_answers_while_a_request_is_being_prepared(server):
    base, llm = server
    entered, release = threading.Event(), threading.Event()
    original = llm.prepare_request

    def slow_prepare(*args, **kwargs):  # stands for the templating and tokenizing of a huge prompt
        entered.set()
        release.wait(30)
        return original(*args, **kwargs)

    llm.prepare_request = slow_prepare
    result = {}
    worker = threading.Thread(target=lambda: result.update(r=chat(base, [{"role": "user", "content": "w5"}])))
    worker.start()
    try:
        assert entered.wait(30)
        health = httpx.get(f"{base}/health", timeout=10)  # answered while the preparation blocks
        assert health.status_code == 200 and not release.is_set()
    finally:
        release.set()
        worker.join(60)
        del llm.prepare_request
    assert result["r"].status_code == 200


def test_a_chunked_body_is_counted_as_it_is_read(server):
    """No Content-Length to refuse it by: the body is counted and cut off past the limit."""
    base, _ = server

    def chunks():
        yield b'{"model": "tiny", "max_tokens": 2, "messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"w5 " * 30
        yield b'"}]}'

    response = httpx.post(f"{base}/v1/chat/completions", timeout=60, content=chunks(),
                          headers={"content-type": "application/json"})
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and response.json()["error"]["type"] == "invalid_request_error"
    assert "--max-body-bytes" in response.json()["error"]["message"]
    assert chat(base, [{"role": "user", "content": "w5 w6"}]).status_code == 200


def test_past_the_concurrency_limit_is_a_json_503_at_once(tiny):
    """A stream holds its place until it ends; the next request is refused in OpenAI's format."""
    from oc_engine.config import UNGUARDED, EngineConfig
    from oc_engine.llm import LLM
    from server_helpers import metric

    loaded = tiny("llama")

    def make_llm():
        return LLM(loaded, EngineConfig(compile=False, max_num_seqs=1, max_model_len=128), UNGUARDED)

    body = {"model": "tiny", "prompt": "w5", "max_tokens": 100, "ignore_eos": True, "stream": True}
    with thread_server(ServerConfig(model_name="tiny", limit_concurrency=1), make_llm) as (base, _):
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", f"{base}/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                next(lines)
                refused = httpx.post(f"{base}/v1/completions", timeout=60, json={**body, "stream": False})
                assert refused.status_code == 503
                assert refused.json()["error"]["code"] == "too_many_requests_in_progress"
                rest = list(lines)
        assert "data: [DONE]" in rest
        assert metric(base, "oc_engine_requests_total", outcome="503") == 1
        assert httpx.get(f"{base}/health", timeout=10).status_code == 200  # the stream's place is free again


def test_a_request_without_max_tokens_gets_the_operators_limit(server):
    base, _ = server
    response = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "model": "tiny", "messages": [{"role": "user", "content": "w5"}], "ignore_eos": True})
    assert response.status_code == 200
    assert response.json()["usage"]["completion_tokens"] == LIMITS["max_tokens_limit"]
    assert response.json()["choices"][0]["finish_reason"] == "length"
