"""`oc-engine serve --backend vllm`, started once for this module as a real process, driven by
the `openai` client: the same contract as the native server (OpenAI's API, the guard's
finish_reason and `oc_engine` report, 4xx error bodies, Prometheus metrics)."""

import asyncio
import json
import signal

import httpx
import openai
import pytest

from conftest import BENIGN, HARMFUL, start_vllm_server

REFUSAL = "I can't help with that."


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    log = tmp_path_factory.mktemp("log") / "serve.log"
    process, base = start_vllm_server(["--max-num-seqs", "4", "--audit-log", str(audit), "--guard-details"], log)
    try:
        yield base, audit
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(60) == 0, log.read_text()[-3000:]  # a graceful stop exits 0
        finally:
            if process.poll() is None:
                process.kill()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)


def chat(client, prompt, **kwargs):
    # Greedy: the server's default temperature samples, and a sampled benign answer can drift into
    # text the classifier blocks (and a harmful one into text it allows): a coin flip, not a test.
    return client.chat.completions.create(model="SmolLM2-135M-Instruct", max_tokens=48, temperature=0,
                                          messages=[{"role": "user", "content": prompt}], **kwargs)


def test_a_harmful_prompt_is_blocked_and_a_benign_one_completes(client):
    blocked = chat(client, HARMFUL[0])
    assert blocked.choices[0].finish_reason == "content_filter"
    assert blocked.choices[0].message.content == REFUSAL
    report = blocked.model_extra["oc_engine"]
    assert report["status"] == "blocked" and report["verdicts"][-1]["verdict"] == "block"
    done = chat(client, BENIGN[0])
    assert done.choices[0].finish_reason in ("stop", "length")
    assert done.model_extra["oc_engine"]["status"] == "completed" and done.choices[0].message.content


def test_four_concurrent_streams_are_each_guarded_on_their_own(server):
    """Two harmful and two benign prompts streamed at once: each harmful stream ends with the
    refusal, having shown only text an allow covered; each benign one streams to its end."""
    async def one(client, prompt):
        text, verdicts, final = "", [], None
        stream = await client.chat.completions.create(
            model="SmolLM2-135M-Instruct", max_tokens=48, stream=True, temperature=0,
            messages=[{"role": "user", "content": prompt}])
        async for chunk in stream:
            extra = chunk.model_extra.get("oc_engine")
            if extra and "verdict" in extra:
                verdicts.append(extra)
            if chunk.choices and chunk.choices[0].delta.content:
                text += chunk.choices[0].delta.content
            if chunk.choices and chunk.choices[0].finish_reason:
                final = (chunk.choices[0].finish_reason, extra)
        return text, verdicts, final

    async def all_four():
        client = openai.AsyncOpenAI(base_url=f"{server[0]}/v1", api_key="unused", max_retries=0, timeout=120)
        return await asyncio.gather(*(one(client, p) for p in (HARMFUL[0], BENIGN[0], HARMFUL[0], BENIGN[1])))

    results = asyncio.run(all_four())
    for (text, _verdicts, (finish, report)), harmful in zip(results, (True, False, True, False)):
        if harmful:
            assert finish == "content_filter" and text.endswith(REFUSAL) and report["status"] == "blocked"
            allowed = [v["covers"] for v in report["verdicts"] if v["verdict"] == "allow"]
            for pause in report["pause_points"]:
                assert report["released_tokens"] <= pause or any(c > pause for c in allowed)
        else:
            assert finish in ("stop", "length") and report["status"] == "completed" and text


def test_bad_input_is_a_4xx_with_an_error_body(server, client):
    with pytest.raises(openai.BadRequestError, match="n: only n=1"):
        chat(client, BENIGN[0], n=2)
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="another-model", messages=[{"role": "user", "content": "hi"}])
    response = httpx.post(f"{server[0]}/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and response.json()["error"]["message"]


def test_metrics_and_the_audit_log_see_the_guard(server, client):
    chat(client, HARMFUL[0])
    metrics = httpx.get(f"{server[0]}/metrics").text
    assert 'oc_engine_requests_total{model_name="SmolLM2-135M-Instruct",outcome="content_filter"}' in metrics
    assert "oc_engine_guard_checks_total" in metrics
    audit = server[1].read_text()
    assert '"block"' in audit


def test_the_audit_log_is_private_and_writes_the_prompt_once(server, client):
    import json
    import stat

    blocked = chat(client, HARMFUL[0])
    assert blocked.choices[0].finish_reason == "content_filter"
    path = server[1]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    mine = [line for line in map(json.loads, path.read_text().splitlines()) if line["request_id"] == blocked.id]
    assert [line["event"] for line in mine][0] == "request" and mine[-1]["event"] == "end"
    assert "block" in {line["event"] for line in mine}
    assert [line.get("prompt") for line in mine] == [HARMFUL[0]] + [None] * (len(mine) - 1)


def test_limits_are_checked_before_any_work(server):
    base = server[0]
    too_long = httpx.post(f"{base}/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "a" * (256 * 2 ** 10 + 1)}], "max_tokens": 2})
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "message_too_long"
    huge = httpx.post(f"{base}/v1/chat/completions", timeout=60, content=b" " * (8 * 2 ** 20 + 1),
                      headers={"content-type": "application/json"})
    assert huge.status_code == 413 and huge.json()["error"]["code"] == "request_too_large"
    assert httpx.get(f"{base}/health", timeout=10).status_code == 200


def test_the_console_and_its_trace(server):
    """The guard console's page, and its trace: one score per token vLLM generated, the
    pauses where the guard paused, numbers only."""
    base = server[0]
    assert httpx.get(f"{base}/").status_code == 200
    assert httpx.get(f"{base}/console/settings").json()["thresholds"]
    body = {"model": "SmolLM2-135M-Instruct", "max_tokens": 32, "temperature": 0, "stream": True,
            "messages": [{"role": "user", "content": HARMFUL[0]}], "oc_engine": {"trace": True}}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=120) as response:
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    chunks = [json.loads(line) for line in lines if line != "[DONE]"]
    events = [c["oc_engine"] for c in chunks if "event" in (c.get("oc_engine") or {})]
    scores = [e for e in events if e["event"] == "score"]
    report = chunks[-1]["oc_engine"]
    assert [s["token_index"] for s in scores] == list(range(report["generated_tokens"]))
    assert all(set(s) == {"event", "token_index", "score", "ema"} for s in scores)
    assert all(s["ema"] is None or 0 <= s["ema"] <= 1 for s in scores)
    assert [e["token_index"] for e in events if e["event"] == "paused"] == report["pause_points"]
