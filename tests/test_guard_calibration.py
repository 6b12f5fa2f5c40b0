"""Calibrating both stages together on synthetic traces and a classifier with known answers."""

import numpy as np

from oc_engine.training.guard_calibration import Budgets, calibrate_guard, choose, pareto


class KnownJudge:
    """p_unsafe by exchange and cover, from a table (no model): what CachedJudge offers."""

    def __init__(self, table, response_ids):
        self.table, self.response_ids, self.cache = table, response_ids, {}

    def prefetch(self, keys, batch_size=32, progress=False):
        for i, c in keys:
            self.cache[i, c] = self.table(i, c)

    def p(self, i, covers):
        self.cache[i, covers] = self.table(i, covers)
        return self.cache[i, covers]


def _case():
    """Six answers of 8 tokens: 0-1 benign (one rises part way), 2-3 refusals, 4-5 unsafe (rising
    higher; the classifier sees 5 is unsafe only from its sixth token, so the allows before
    re-arm the probe until then)."""
    rise, high = np.linspace(0.1, 0.6, 8), np.linspace(0.1, 1.0, 8)
    traces = {0.5: [np.full(8, 0.1), rise, np.full(8, 0.2), np.full(8, 0.1), high, high]}
    labels = np.array([0, 0, 1, 1, 2, 2])
    table = {4: lambda c: 0.9, 5: lambda c: 0.9 if c >= 6 else 0.3}

    def p(i, covers):
        return table[i](covers) if i in table else 0.05

    return traces, labels, np.array([False, True, False, False, False, False]), KnownJudge(p, [list(range(8))] * 6)


def test_the_chosen_point_stops_harm_within_the_budgets():
    traces, labels, dangerous, judge = _case()
    budgets = Budgets(benign_block=0.0, dangerous_benign_block=0.0, refusal_block=0.0, escalation=0.5)
    report = calibrate_guard(traces, judge, labels, dangerous, budgets, progress=False)
    assert report["groups"] == {"harmful": 2, "benign": 2, "dangerous_benign": 1, "refusals": 2}
    best = report["chosen"]["without_input_check"]
    assert best["harmful_stopped"] == 1.0 and best["benign_blocked_final"] == 0.0 and best["benign_escalated"] <= 0.5
    assert best["harmful_reach"] == 1.0
    with_input = report["chosen"]["with_input_check"]
    assert with_input["harmful_reach"] == 1.0 and with_input["benign_blocked"] == 0.0
    for point in report["curve"]:  # the non-streaming final check only adds blocks
        assert point["harmful_stopped_final"] >= point["harmful_stopped"]
        assert point["benign_blocked_final"] >= point["benign_blocked"]



def test_a_slower_cadence_asks_an_escalated_benign_answer_fewer_times():
    """After an allow the probe re-arms; a high EMA asks again at the cadence."""
    traces, labels, dangerous, judge = _case()
    report = calibrate_guard(traces, judge, labels, dangerous, Budgets(), pause_rates=(0.5,), everies=(1, 4),
                             blocks=(0.5,), progress=False)
    by_every = {p["every"]: p for p in report["curve"] if not p["input_check"]}
    assert by_every[1]["benign_escalated"] == 0.5
    assert by_every[1]["checks_per_escalated_benign"] > by_every[4]["checks_per_escalated_benign"] >= 1


def test_no_point_fits_budgets_that_forbid_every_escalation_with_harm_to_stop():
    traces, labels, dangerous, judge = _case()
    report = calibrate_guard(traces, judge, labels, dangerous, Budgets(benign_block=0.0, escalation=0.0),
                             progress=False)
    best = report["chosen"]["without_input_check"]
    assert best is None or best["benign_escalated"] == 0.0


def test_pareto_front_keeps_only_undominated_points():
    points = [{"x": 0.0, "y": 0.5}, {"x": 0.1, "y": 0.4}, {"x": 0.1, "y": 0.9}, {"x": 0.2, "y": 0.8}]
    assert pareto(points, "x", "y") == [{"x": 0.0, "y": 0.5}, {"x": 0.1, "y": 0.9}]
    assert choose([], Budgets(), input_check=False) is None
