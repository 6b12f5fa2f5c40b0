"""`bench serve`'s clients against a real (tiny, in-process) server, so they cannot rot: the
openai client in its own process and the bench's own client, the usage counts, the blocked
answers, the steady rate, the prompt selection, and the guard and event-loop counters; then
the targets and the cost split computed from results."""

import asyncio

import pytest

from oc_engine.bench.serve import _targets, allowed_prompts, cost_split, run_client_process, run_load, server_counters
from oc_engine.guard.policy import GuardConfig
from oc_engine.server import ServerConfig
from probe_helpers import FakeClassifier, make_probe
from server_helpers import thread_server


@pytest.fixture(scope="module")
def blocking_server(tiny):
    """Every answer pauses at its first token and is blocked."""
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    # The tiny tokenizer has no chat template, and the clients send chat requests.
    loaded.tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    probe = make_probe(loaded.model, bias=20.0)

    def make_llm():
        return LLM(loaded, EngineConfig(compile=False, max_num_seqs=2, max_model_len=64),
                   GuardSetup(probe=probe, classifier=FakeClassifier("block"), policy=GuardConfig(refusal="NO")))

    try:
        with thread_server(ServerConfig(model_name="tiny", guard_details=True), make_llm) as (base, _):
            yield base
    finally:
        loaded.tokenizer.chat_template = None


def test_the_bench_client_reports_what_the_server_did(blocking_server):
    base = blocking_server
    before = server_counters(base)
    run = asyncio.run(run_load(base, "tiny", ["w5 w6", "w7 w8 w9"], concurrency=2, requests=5, max_tokens=6))
    after = server_counters(base)
    assert run["requests"] == 5 and run["content_filter"] == 5  # every answer blocked
    assert run["output_tokens"] >= 5 and run["tokens_per_s"] > 0 and run["steady_tokens_per_s"] > 0
    assert run["ttft_ms"]["p50"] is not None  # the refusal is the first content
    assert after["checks"] - before["checks"] == 5 and after["blocks"] - before["blocks"] == 5
    assert after["loop_lag_samples"] > before["loop_lag_samples"], "the event loop's lag is sampled"


def test_the_openai_client_process_counts_what_it_was_shown(blocking_server):
    run = run_client_process(blocking_server, "tiny", ["w5 w6", "w7 w8 w9"], concurrency=2, requests=4,
                             max_tokens=6)
    assert run["requests"] == 4 and run["finish_reasons"] == {"content_filter": 4}
    # Shown: the refusal only (usage counts released tokens, none here); generated: what was decoded.
    assert run["shown_tokens"] == 0 and run["generated_tokens"] >= 4
    assert run["wall_s"] > 0 and run["ttft_ms"]["p50"] is not None


def test_the_prompt_selection_keeps_what_the_guard_allows(blocking_server):
    assert allowed_prompts(blocking_server, "tiny", ["w5 w6", "w7 w8 w9", "w1"], concurrency=2, max_tokens=4) == []


def run_of(concurrency, steady, rate=None, gap=(10.0, 20.0), shown=100, generated=None, blocks=0, lag=(1.0, 100)):
    return {"concurrency": concurrency, "requests": 2 * concurrency, "tokens_per_s": rate or steady,
            "steady_tokens_per_s": steady, "ttft_ms": {"p50": 100.0, "p99": 200.0},
            "chunk_gap_ms": {"p50": gap[0], "p99": gap[1]}, "shown_tokens": shown, "generated_tokens": generated,
            "finish_reasons": {"content_filter": blocks} if blocks else {"stop": 1},
            "server": {"pauses": 4, "checks": 3, "classifier_s": 0.5, "loop_lag_s": lag[0] / 1000 * lag[1],
                       "loop_lag_samples": lag[1]}}


def test_targets_compare_what_the_client_saw():
    results = {"unguarded": {"runs": [run_of(1, 30), run_of(16, 300)]},
               "guarded": {"runs": [run_of(16, 280, gap=(10.0, 40.0))]},
               "transformers": {"runs": [run_of(1, 20), run_of(16, 100)]},
               "vllm-unguarded": {"runs": [run_of(16, 400)]}}
    targets = _targets(results, (1, 16), library=40.0)
    assert targets["unguarded_vs_vllm_at_top"] == {"value": 0.75, "target": 1.0, "met": False}
    assert targets["one_client_vs_library_batch1"] == {"value": 0.75, "target": 0.9, "met": False}
    assert targets["unguarded_vs_transformers_at_1"] == {"value": 1.5, "target": 2.0, "met": False}
    assert targets["unguarded_vs_transformers_at_16"] == {"value": 3.0, "target": 2.0, "met": True}
    assert targets["guarded_vs_unguarded_steady_at_top"] == {"value": 0.933, "target": 0.9, "met": True}
    assert targets["guarded_gap_p99_over_p50_at_top"] == {"value": 4.0, "target": 3.0, "met": False}


def test_the_cost_split_parts_add_up():
    results = {"unguarded": {"runs": [run_of(4, 200, lag=(0.5, 100))]},
               "probe-only": {"runs": [run_of(4, 190, lag=(0.6, 100))]},
               "guarded": {"runs": [run_of(4, 150, shown=90, generated=120, blocks=0, lag=(2.0, 100))]}}
    (row,) = cost_split(results)
    assert row["probe_cost"] == 0.05 and row["checks_cost"] == 0.2
    assert row["guarded_vs_unguarded"] == pytest.approx(1 - row["probe_cost"] - row["checks_cost"])
    assert row["held_share"] == 0.25
    assert row["loop_lag_ms"] == {"unguarded": 0.5, "probe-only": 0.6, "guarded": 2.0}


def test_the_join_bench_measures_the_running_answers_gaps(tiny):
    from oc_engine.bench.join import join_markdown_table, run_join_bench
    from probe_helpers import plain_llm

    llm = plain_llm(tiny("llama"), max_num_seqs=3, max_model_len=128)
    report = run_join_bench(llm, ["w5 w6", "w7 w8 w9"], chunks=(0, 4), prompt_tokens=24, repeats=1, warm_tokens=3,
                            after_tokens=2)
    assert [r["prefill_chunk"] for r in report["results"]] == [None, 4] and report["running"] == 2
    for row in report["results"]:
        assert row["gaps"] > 0 and row["gap_ms_during"]["p99"] >= row["gap_ms_during"]["p50"] > 0
        assert row["joining_ttft_s"] > 0
    assert "chunk" in join_markdown_table(report)


def test_rounds_judge_each_target_on_the_median_of_per_round_ratios():
    from oc_engine.bench.serve import median_rate, round_order, serve_markdown_table

    def tagged(run, turn):
        return {**run, "round": turn}

    # Round 0: the machine was fast for unguarded and slow for guarded (0.7x); rounds 1 and 2
    # read 0.95x and 1.0x. One round alone would call the target missed.
    results = {"unguarded": {"runs": [tagged(run_of(16, 400), 0), tagged(run_of(16, 300), 1),
                                      tagged(run_of(16, 250), 2)]},
               "probe-only": {"runs": [tagged(run_of(16, 380), t) for t in range(3)]},
               "guarded": {"runs": [tagged(run_of(16, 280, gap=(10.0, 40.0)), 0),
                                    tagged(run_of(16, 285, gap=(10.0, 25.0)), 1),
                                    tagged(run_of(16, 250, gap=(10.0, 28.0)), 2)]}}
    targets = _targets(results, (16,), library=None)
    assert targets["guarded_vs_unguarded_steady_at_top"] == {"value": 0.95, "target": 0.9, "met": True,
                                                             "rounds": [0.7, 0.95, 1.0]}
    assert targets["guarded_gap_p99_over_p50_at_top"] == {"value": 2.8, "target": 3.0, "met": True,
                                                          "rounds": [4.0, 2.5, 2.8]}
    rows = cost_split(results)
    assert [(r["round"], r["guarded_vs_unguarded"]) for r in rows] == [(0, 0.7), (1, 0.95), (2, 1.0)]
    assert median_rate(results, "unguarded", 16) == 300 and median_rate(results, "transformers", 16) is None
    assert [round_order(("a", "b", "c"), t) for t in range(4)] == [("a", "b", "c"), ("b", "c", "a"),
                                                                   ("c", "a", "b"), ("a", "b", "c")]
    report = {"command_settings": {"rounds": 3}, "results": results, "cost_split": rows, "targets": targets}
    table = serve_markdown_table(report)
    assert "3 rounds" in table and "| 2 | guarded | 16 |" in table and "| 3 | 16 | 250 | 380 | 250 |" in table


def test_one_round_reports_as_before():
    results = {"unguarded": {"runs": [run_of(16, 300)]}, "guarded": {"runs": [run_of(16, 285)]}}
    assert _targets(results, (16,), library=None)["guarded_vs_unguarded_steady_at_top"] == {
        "value": 0.95, "target": 0.9, "met": True}
