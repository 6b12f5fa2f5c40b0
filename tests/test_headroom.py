"""`oc-engine headroom`: folds grouped by prompt, the catch rate at a benign rate, and the
cross-validated report on a tiny model and classifier."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from probe_helpers import make_probe

from oc_engine.data import Exchange
from oc_engine.errors import OcEngineError
from oc_engine.training.headroom import HeadroomConfig, assign_folds, caught_at_benign_rate, headroom


def test_folds_keep_each_prompt_together_and_use_every_fold():
    rows = [Exchange(f"prompt {i % 40}", f"answer {i}", i % 3) for i in range(200)]
    rows.append(Exchange("  PROMPT 7 ", "same prompt, other spelling", 0))
    folds = assign_folds(rows, 5)
    by_prompt = {}
    for row, fold in zip(rows, folds):
        by_prompt.setdefault(row.prompt.strip().lower(), set()).add(int(fold))
    assert all(len(f) == 1 for f in by_prompt.values())
    assert set(folds.tolist()) == set(range(5))
    assert (assign_folds(rows, 5) == folds).all()


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 20), st.sampled_from([0, 1, 2])), min_size=2, max_size=40),
       st.sampled_from([0.05, 0.1, 0.25, 0.5]))
def test_caught_at_benign_rate_is_the_best_threshold_within_the_rate(rows, rate):
    scores = np.array([s / 20 for s, _ in rows])
    labels = np.array([label for _, label in rows])
    if not (labels == 0).any() or not (labels == 2).any():
        return
    best = 0.0  # brute force over every threshold that matters
    for threshold in list(scores) + [np.inf]:
        if (scores[labels == 0] >= threshold).mean() <= rate:
            best = max(best, float((scores[labels == 2] >= threshold).mean()))
    assert caught_at_benign_rate(scores, labels, rate) == pytest.approx(best)


def test_config_rejects_bad_values():
    with pytest.raises(OcEngineError, match="folds"):
        HeadroomConfig(folds=1)
    with pytest.raises(OcEngineError, match="benign rate"):
        HeadroomConfig(benign_rate=1.0)


def test_headroom_on_separable_exchanges(tiny, tiny_classifier, tmp_path, monkeypatch):
    from oc_engine.guard.classifier import ExchangeClassifier
    from oc_engine.training.headroom import headroom_markdown

    monkeypatch.setenv("OC_ENGINE_CACHE", str(tmp_path / "cache"))
    loaded = tiny("llama")
    words = {0: "w200 w201 w202 w203", 2: "w100 w101 w102 w103 w104"}
    rows = [Exchange(f"w{20 + i} w9", f"{words[(0, 2)[i % 2]]} w{400 + i % 7}", (0, 2)[i % 2]) for i in range(60)]
    probe = make_probe(loaded.model, bias=0.0, layers=(-2,), alpha=0.5)
    classifier = ExchangeClassifier(tiny_classifier[1])
    try:
        report = headroom(loaded, probe, rows, HeadroomConfig(folds=3, max_response_tokens=8, probe_steps=100,
                                                              classifier_epochs=1.0),
                          classifier=classifier, checkpoint=tiny_classifier[0], progress=False)
    finally:
        classifier.close()
    assert (report["exchanges"], report["unsafe"], report["benign"]) == (60, 30, 30)
    assert set(report["shipped"]) == set(report["cross_validated"]) == {"probe", "probe_first", "classifier", "both"}
    # the two answer kinds differ in every token: a probe trained on the other folds separates them
    assert report["cross_validated"]["probe"]["auroc"] > 0.95
    assert report["cross_validated"]["probe"]["caught"] > 0.9
    for stage in report["shipped"].values():
        assert 0 <= stage["auroc"] <= 1 and 0 <= stage["caught"] <= 1
    assert "| probe (highest EMA" in headroom_markdown(report)
    json.dumps(report)


def test_headroom_needs_both_classes(tiny):
    loaded = tiny("llama")
    rows = [Exchange(f"w{20 + i} w9", "w100 w101", 2) for i in range(10)]
    with pytest.raises(OcEngineError, match="unsafe_compliance and safe_compliance"):
        headroom(loaded, make_probe(loaded.model, bias=0.0), rows, HeadroomConfig(), progress=False)


def test_headroom_needs_both_classes_outside_every_fold(tiny):
    loaded = tiny("llama")
    rows = [Exchange("w20 w9", "w100 w101", 2)] + [Exchange(f"w{30 + i} w9", "w200", 0) for i in range(12)]
    with pytest.raises(OcEngineError, match="too few exchanges for 3 folds"):
        headroom(loaded, make_probe(loaded.model, bias=0.0), rows, HeadroomConfig(folds=3), progress=False)
