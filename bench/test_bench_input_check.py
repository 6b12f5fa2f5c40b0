"""pytest-benchmark: the input check's cost in time to first shown token, with the shipped classifier.

    uv run pytest bench/test_bench_input_check.py --benchmark-enable

`oc-engine bench input-check` reports the same runs as a table.
"""

from oc_engine.bench.input_check import MODES, run_input_check_bench


def test_input_check(benchmark, embedded):
    from oc_engine.models.defaults import resolve_classifier

    loaded, _ = embedded
    classifier = resolve_classifier(None, "cpu", required=True)
    try:
        report = benchmark.pedantic(lambda: run_input_check_bench(loaded, classifier, rounds=2),
                                    rounds=1, iterations=1)
    finally:
        classifier.close()
    rows = {r["mode"]: r for r in report["results"]}
    assert list(rows) == list(MODES)
    assert rows["off"]["input_check_ms"] is None and rows["input_check"]["input_check_ms"] > 0
    benchmark.extra_info.update(cost_ms=report["input_check_cost_ms"])
