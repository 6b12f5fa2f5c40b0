"""The guard console's server side, through a started server and raw HTTP: the page and its
files, the settings it reads (behind the key), and the `oc_engine.trace` stream option that
feeds its live trace: one score per generated token, the very scores and EMAs the library's
own trace records, sent only by a server started with `--guard-details`, and never a token.
(The page itself is driven in a real browser in `test_console_browser.py`.)"""

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oc_engine.server import ServerConfig
from probe_helpers import FakeClassifier, make_probe
from server_helpers import sse_events, thread_server

KEY = "sk-console"
PROMPT = "w5 w6 w7"


def engine_config():
    from oc_engine.config import EngineConfig

    return EngineConfig(compile=False, max_num_seqs=2, max_model_len=128)


def guarded_llm(loaded, probe, verdict="allow", record_trace=False):
    from oc_engine.config import GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    return LLM(loaded, engine_config(), GuardSetup(probe=probe, classifier=FakeClassifier(verdict),
                                                   policy=GuardConfig(refusal="REFUSED"), record_trace=record_trace))


@pytest.fixture(scope="module")
def probe(tiny):
    return make_probe(tiny("llama").model, bias=0.5, warn=0.5, pause=0.6)  # EMA near 0.6: pauses now and then


@pytest.fixture(scope="module")
def detailed(tiny, probe):
    """A server that sends the guard's details, behind a key."""
    config = ServerConfig(model_name="tiny", guard_details=True, api_key=KEY)
    with thread_server(config, lambda: guarded_llm(tiny("llama"), probe)) as (base, _):
        yield base


@pytest.fixture(scope="module")
def plain(tiny, probe):
    """A server with the defaults: no guard details, no key."""
    with thread_server(ServerConfig(model_name="tiny"), lambda: guarded_llm(tiny("llama"), probe)) as (base, _):
        yield base


def stream(base, key=KEY, **body):
    body = {"model": "tiny", "prompt": PROMPT, "temperature": 0, "max_tokens": 12, "ignore_eos": True,
            "stream": True, "oc_engine": {"trace": True}, **body}
    headers = {"authorization": f"Bearer {key}"} if key else {}
    with httpx.stream("POST", f"{base}/v1/completions", json=body, headers=headers, timeout=60) as response:
        assert response.status_code == 200, response.read()
        return [e for e in sse_events(response) if e != "[DONE]"]


def guard_events(chunks, kind):
    return [c["oc_engine"] for c in chunks if (c.get("oc_engine") or {}).get("event") == kind]


def test_the_trace_is_the_librarys_own_trace(detailed, tiny, probe):
    from oc_engine.params import SamplingParams

    chunks = stream(detailed)
    scores = guard_events(chunks, "score")
    final = chunks[-1]["oc_engine"]
    assert [s["token_index"] for s in scores] == list(range(final["generated_tokens"])) == list(range(12))
    assert all(set(s) == {"event", "token_index", "score", "ema"} for s in scores), "numbers only, never a token"
    # The library, run alone with its own trace on: the same scores and EMAs, token by token.
    loaded = tiny("llama")
    with guarded_llm(loaded, probe, record_trace=True) as llm:
        ids = list(loaded.tokenizer(PROMPT)["input_ids"])
        run = llm.run([ids], SamplingParams(max_tokens=12, ignore_eos=True), on_event=lambda e: None)[0]
    rows = run.guard.trace_rows()
    assert [s["score"] for s in scores] == pytest.approx([r["score"] for r in rows], rel=1e-5, abs=1e-6)
    assert [s["ema"] for s in scores] == pytest.approx([r["ema"] for r in rows], rel=1e-5, abs=1e-6)
    assert [p["token_index"] for p in guard_events(chunks, "paused")] == final["pause_points"]
    assert final["pause_points"], "this probe pauses: the trace carries pauses and verdicts too"
    assert len(guard_events(chunks, "verdict")) == len(final["verdicts"])


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(max_tokens=st.integers(1, 20), stop=st.lists(st.sampled_from(["w", "1", " w", "zz"]), max_size=2))
def test_one_score_per_token_generated_and_each_before_its_text(detailed, max_tokens, stop):
    chunks = stream(detailed, max_tokens=max_tokens, stop=stop)
    final = chunks[-1]["oc_engine"]
    seen = -1
    for chunk in chunks:
        event = chunk.get("oc_engine") or {}
        if event.get("event") == "score":
            assert event["token_index"] == seen + 1
            seen += 1
    assert seen + 1 == final["generated_tokens"]


def test_a_server_without_guard_details_refuses_a_trace(plain):
    response = httpx.post(f"{plain}/v1/completions", timeout=60, json={
        "model": "tiny", "prompt": PROMPT, "max_tokens": 2, "stream": True, "oc_engine": {"trace": True}})
    assert response.status_code == 403
    assert response.json()["error"]["code"] == "guard_details_not_allowed"
    assert "--guard-details" in response.json()["error"]["message"]


def test_a_trace_needs_a_stream(detailed):
    response = httpx.post(f"{detailed}/v1/completions", timeout=60, headers={"authorization": f"Bearer {KEY}"},
                          json={"model": "tiny", "prompt": PROMPT, "max_tokens": 2, "oc_engine": {"trace": True}})
    assert response.status_code == 400 and "stream" in response.json()["error"]["message"]


def test_an_unguarded_server_has_no_trace(tiny):
    from oc_engine.config import UNGUARDED
    from oc_engine.llm import LLM

    config = ServerConfig(model_name="tiny", guard_details=True)
    with thread_server(config, lambda: LLM(tiny("llama"), engine_config(), UNGUARDED)) as (base, _):
        response = httpx.post(f"{base}/v1/completions", timeout=60, json={
            "model": "tiny", "prompt": PROMPT, "max_tokens": 2, "stream": True, "oc_engine": {"trace": True}})
        assert response.status_code == 400 and "needs a guard" in response.json()["error"]["message"]
        assert httpx.get(f"{base}/console/settings").json()["guarded"] is False


def test_the_page_and_its_files(plain):
    page = httpx.get(f"{plain}/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    policy = page.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy and "frame-ancestors 'none'" in policy
    for name, kind in [("console.js", "javascript"), ("console.css", "text/css"), ("favicon.svg", "image/svg+xml")]:
        assert f"/console/static/{name}" in page.text
        response = httpx.get(f"{plain}/console/static/{name}")
        assert response.status_code == 200 and kind in response.headers["content-type"], name
    assert httpx.head(f"{plain}/").status_code == 200
    assert "http" not in httpx.get(f"{plain}/console/static/console.js").text.replace("http://www.w3.org", ""), \
        "the page fetches nothing from elsewhere"


def test_the_settings_are_behind_the_key_and_the_thresholds_behind_guard_details(detailed, plain, probe):
    assert httpx.get(f"{detailed}/console/settings").status_code == 401
    assert httpx.get(f"{detailed}/").status_code == 200, "the page holds no data: it asks for the key"
    mine = httpx.get(f"{detailed}/console/settings", headers={"authorization": f"Bearer {KEY}"}).json()
    assert mine["guard_details"] is True and mine["guarded"] is True and mine["model"] == "tiny"
    assert mine["thresholds"] == {"warn": probe.config.warn, "pause": probe.config.pause}
    public = httpx.get(f"{plain}/console/settings").json()
    assert public["guard_details"] is False and "thresholds" not in public


def test_no_console_serves_no_page(tiny, probe):
    config = ServerConfig(model_name="tiny", console=False)
    with thread_server(config, lambda: guarded_llm(tiny("llama"), probe)) as (base, _):
        assert httpx.get(f"{base}/").status_code == 404
        assert httpx.get(f"{base}/console/settings").status_code == 404
        assert httpx.get(f"{base}/console/static/console.js").status_code == 404
        assert httpx.get(f"{base}/health").status_code == 200


def test_the_library_streams_a_score_per_token_when_asked(tiny, probe):
    from oc_engine.config import UNGUARDED
    from oc_engine.errors import OcEngineError
    from oc_engine.llm import LLM
    from oc_engine.outputs import Finished, TextReleased, TokenScored
    from oc_engine.params import SamplingParams

    loaded = tiny("llama")
    ids = list(loaded.tokenizer(PROMPT)["input_ids"])
    params = SamplingParams(max_tokens=10, ignore_eos=True, temperature=0)
    with guarded_llm(loaded, probe) as llm:
        events = list(llm.stream(ids, params, trace=True))
        assert not any(isinstance(e, TokenScored) for e in llm.stream(ids, params)), "only when asked"
    scored = [e.token_index for e in events if isinstance(e, TokenScored)]
    assert scored == list(range(events[-1].completion.generated_tokens)) == list(range(10))
    assert isinstance(events[-1], Finished) and any(isinstance(e, TextReleased) for e in events)
    with LLM(loaded, engine_config(), UNGUARDED) as llm, pytest.raises(OcEngineError, match="needs a guard"):
        list(llm.stream(ids, params, trace=True))
