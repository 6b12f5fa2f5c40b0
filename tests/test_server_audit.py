"""The audit log as an operator needs it: private (0600, never through a symlink), bounded
(rotated by size, nothing written for requests without a key), linear (the prompt once per
request, then one line per event), and, with `--audit-required`, fail closed: once a write
fails no more guarded text leaves and /health says why. Over a started server and raw HTTP."""

import json
import os
import stat
import subprocess
import sys

import httpx
import pytest

from oc_engine.errors import OcEngineError
from oc_engine.server import ServerConfig
from oc_engine.server.audit import AuditLog
from probe_helpers import FakeClassifier, make_probe
from server_helpers import ROOT, metric, sse_events, thread_server

KEY = "sk-audit"


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_the_log_is_created_0600_and_an_existing_one_narrowed(tmp_path):
    AuditLog(tmp_path / "new" / "audit.jsonl").close()
    assert _mode(tmp_path / "new" / "audit.jsonl") == 0o600
    existing = tmp_path / "open.jsonl"
    existing.write_text("")
    existing.chmod(0o644)
    AuditLog(existing).close()
    assert _mode(existing) == 0o600


def test_a_symlink_is_refused_not_followed(tmp_path):
    target = tmp_path / "elsewhere"
    target.write_text("untouched\n")
    link = tmp_path / "audit.jsonl"
    link.symlink_to(target)
    with pytest.raises(OcEngineError, match="symbolic link"):
        AuditLog(link)
    assert target.read_text() == "untouched\n"


def test_the_log_rotates_by_size_and_loses_no_line_it_keeps(tmp_path):
    path = tmp_path / "audit.jsonl"
    audit = AuditLog(path, max_bytes=2000, backups=3)
    for i in range(60):  # about 130 bytes a line: about 15 per file
        audit.error(f"req-{i:03d}", 400, "x" * 40)
    audit.close()
    files = [path] + [path.with_name(f"audit.jsonl.{n}") for n in (1, 2, 3)]
    assert all(f.exists() and f.stat().st_size <= 2000 and _mode(f) == 0o600 for f in files)
    assert not path.with_name("audit.jsonl.4").exists()
    kept = [json.loads(line)["request_id"] for f in reversed(files) for line in f.read_text().splitlines()]
    assert kept == [f"req-{i:03d}" for i in range(60 - len(kept), 60)], "the newest lines, in order, none torn"


def test_a_failed_write_is_remembered():
    audit = AuditLog("/dev/full")  # every write fails with ENOSPC
    audit.error("req-1", 400, "bad")
    assert audit.failed and "No space left" in audit.failed
    audit.close()


def test_audit_required_without_a_log_is_one_line(tmp_path):
    run = subprocess.run([sys.executable, "-m", "oc_engine.cli", "serve", "--audit-required"], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "audit_required needs an audit log (--audit-log FILE)" in run.stderr
    assert len(run.stderr.strip().splitlines()) == 1, run.stderr


def _guarded_server(tiny, config):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=20.0)  # pauses on the first token: a guard event at once

    def make_llm():
        return LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=128),
                   GuardSetup(probe=probe, classifier=FakeClassifier("allow"), policy=GuardConfig(refusal="REFUSED")))
    return thread_server(config, make_llm)


def test_one_line_per_event_the_prompt_once_and_nothing_without_a_key(tiny, tmp_path):
    path = tmp_path / "audit.jsonl"
    with _guarded_server(tiny, ServerConfig(model_name="tiny", api_key=KEY, audit_log=str(path))) as (base, _):
        auth = {"authorization": f"Bearer {KEY}"}
        answer = httpx.post(f"{base}/v1/completions", headers=auth, timeout=60,
                            json={"prompt": "w5 w6 w7", "max_tokens": 12, "ignore_eos": True}).json()
        for key in (None, "sk-wrong"):
            headers = {"authorization": f"Bearer {key}"} if key else {}
            assert httpx.post(f"{base}/v1/completions", headers=headers, timeout=60,
                              json={"prompt": "w1", "max_tokens": 2}).status_code == 401
        assert metric(base, "oc_engine_requests_total", key=KEY, outcome="401") == 2
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {line["request_id"] for line in lines} == {answer["id"]}, "a request without a key writes nothing"
    events = [line["event"] for line in lines]
    assert events[0] == "request" and events[-1] == "end" and {"pause", "verdict"} <= set(events)
    assert [line.get("prompt") for line in lines] == ["w5 w6 w7"] + [None] * (len(lines) - 1)
    assert all("verdicts" not in line for line in lines), "each verdict is written once, on its own line"
    assert lines[-1]["released_text"] == answer["choices"][0]["text"]


def test_a_failed_write_stops_guarded_text_and_fails_health(tiny):
    config = ServerConfig(model_name="tiny", audit_log="/dev/full", audit_required=True)
    with _guarded_server(tiny, config) as (base, _):
        assert httpx.get(f"{base}/health").status_code == 200  # nothing written yet
        with httpx.stream("POST", f"{base}/v1/completions", timeout=60, json={
                "prompt": "w5 w6 w7", "max_tokens": 12, "ignore_eos": True, "stream": True}) as response:
            events = sse_events(response)
        assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "audit_unavailable"
        assert not "".join(c["choices"][0]["text"] for c in events[:-2] if c.get("choices")), "no text released"
        health = httpx.get(f"{base}/health")
        assert health.status_code == 503 and "audit log cannot be written" in health.json()["reason"]
        refused = httpx.post(f"{base}/v1/completions", timeout=60, json={"prompt": "w1", "max_tokens": 2})
        assert refused.status_code == 503 and "audit" in refused.json()["error"]["message"]
