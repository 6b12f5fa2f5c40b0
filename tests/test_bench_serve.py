"""`bench serve`'s load generator against a real (tiny, in-process) server, so it cannot rot:
the usage counts, the blocked answers, the steady rate and the guard counters it reports."""

import asyncio

from oc_engine.bench.serve import _targets, guard_counters, run_load
from oc_engine.guard.policy import GuardConfig
from oc_engine.server import ServerConfig
from probe_helpers import FakeClassifier, make_probe
from server_helpers import thread_server


def test_the_load_generator_reports_what_the_server_did(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    # The tiny tokenizer has no chat template, and the load generator sends chat requests.
    loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    probe = make_probe(loaded.model, bias=20.0)  # every answer pauses at its first token

    def make_llm():
        return LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=64),
                   GuardSetup(probe=probe, classifier=FakeClassifier("block"), policy=GuardConfig(refusal="NO")))

    try:
        with thread_server(ServerConfig(model_name="tiny", guard_details=True), make_llm) as (base, _):
            before = guard_counters(base)
            run = asyncio.run(run_load(base, "tiny", ["w5 w6", "w7 w8 w9"], concurrency=2, requests=5, max_tokens=6))
            after = guard_counters(base)
    finally:
        loaded.tokenizer.chat_template = None
    assert run["requests"] == 5 and run["content_filter"] == 5  # every answer blocked
    assert run["output_tokens"] >= 5 and run["tokens_per_s"] > 0 and run["steady_tokens_per_s"] > 0
    assert run["ttft_ms"]["p50"] is not None  # the refusal is the first content
    assert after["checks"] - before["checks"] == 5 and after["blocks"] - before["blocks"] == 5


def test_targets_compare_the_servers_that_ran():
    def result(rate, steady, gap=(10.0, 20.0)):
        return {"runs": [{"concurrency": 16, "tokens_per_s": rate, "steady_tokens_per_s": steady,
                          "chunk_gap_ms": {"p50": gap[0], "p99": gap[1]}}]}

    targets = _targets({"unguarded": result(300, 300), "guarded": result(240, 280, (10.0, 40.0)),
                        "transformers": result(100, 100)}, (16,))
    assert targets["unguarded_vs_transformers_at_top"] == {"ratio": 3.0, "target": 2.0, "met": True}
    assert targets["guarded_vs_unguarded_tokens_per_s"]["met"] is False
    assert targets["guarded_vs_unguarded_steady_tokens_per_s"]["ratios"] == {16: 0.933}
    assert targets["guarded_gap_p99_over_p50_at_top"]["met"] is False
