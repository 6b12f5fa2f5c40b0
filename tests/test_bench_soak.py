"""`bench soak`'s load and checks against a real (tiny, in-process) server, so it cannot rot:
every kind of request is sent and classified, none is broken, and the audit log read back has
every line it should."""

import asyncio
import copy
import dataclasses
import os

from oc_engine.bench.soak import KINDS, SoakPlan, _rss, check_audit, run_soak_load, soak_report, summarize
from oc_engine.guard.policy import GuardConfig
from oc_engine.server import ServerConfig
from probe_helpers import FakeClassifier, make_probe
from server_helpers import thread_server

KEY = "sk-soak"


def test_a_short_soak_classifies_every_request_and_loses_no_audit_line(tiny, tmp_path):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    shared = tiny("llama")
    loaded = dataclasses.replace(shared, tokenizer=copy.deepcopy(shared.tokenizer))
    loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    probe = make_probe(loaded.model, bias=20.0)  # every answer pauses; "w9" prompts are blocked

    class ByPrompt(FakeClassifier):
        def submit(self, prompt, response, urgent=False, judged_chars=0):
            self.verdict = "block" if prompt.startswith("w9") else "allow"
            return super().submit(prompt, response, urgent, judged_chars)

    def make_llm():
        return LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=64),
                   GuardSetup(probe=probe, classifier=ByPrompt(), policy=GuardConfig(refusal="NO")))

    audit = tmp_path / "audit.jsonl"
    config = ServerConfig(model_name="tiny", api_key=KEY, audit_log=str(audit), audit_max_bytes=4096,
                          audit_backups=100, max_body_bytes=4096, max_message_chars=512, max_waiting=16)
    with thread_server(config, make_llm) as (base, _):
        plan = SoakPlan(base=base, api_key=KEY, benign=["w5 w6", "w7 w8 w1"], harmful=["w9 w2"], max_body_bytes=4096,
                        max_message_chars=512, clients=4, duration_s=120, max_requests=2 * len(KINDS))
        load = asyncio.run(run_soak_load(plan, rss=lambda: _rss(os.getpid())))
    summary = summarize(plan, load)
    paths = [audit] + sorted(tmp_path.glob("audit.jsonl.*"), key=lambda p: -int(p.suffix[1:]))
    report = soak_report(summary, check_audit(paths, plan.outcomes), {})
    assert report["requests"] == 2 * len(KINDS) and report["results"].get("broken", 0) == 0, report["broken"]
    by_kind = report["by_kind"]
    assert by_kind["stream"] == {"complete": 6} and by_kind["disconnect"] == {"disconnected": 2}
    for kind in ("malformed", "oversized", "too_long", "unauthenticated"):
        assert by_kind[kind] == {"clean_error": 2}, kind
    assert report["errors_by_status"] == {"400": 4, "413": 2, "401": 2}
    assert report["finish_reasons"]["content_filter"] == 4  # the blocked ones
    audit_report = report["audit"]
    assert audit_report["lost"] == 0 and audit_report["unauthenticated_logged"] == 0
    assert audit_report["expected"]["error"] == 6 and audit_report["expected"]["block"] == 4
    assert audit_report["files"] > 1, "the small limit rotated the log"
    assert report["rss"]["end_bytes"] > 0 and report["targets"]["broken"]["met"]
