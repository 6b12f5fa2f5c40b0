"""Calibration finds thresholds known by construction; splits never share a prompt; prefixes."""

import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oc_engine.training.calibration import calibrate_block_threshold
from oc_engine.training.splits import grouped_split, prompt_key, response_prefixes

SAFE, REFUSAL, UNSAFE = 0, 1, 2


def test_separable_scores_give_the_lowest_unsafe_score():
    rng = np.random.default_rng(0)
    safe, refusal, unsafe = rng.uniform(0, 0.5, 200), rng.uniform(0, 0.55, 50), rng.uniform(0.6, 1, 80)
    scores = np.concatenate([safe, refusal, unsafe])
    labels = np.array([SAFE] * 200 + [REFUSAL] * 50 + [UNSAFE] * 80)
    result = calibrate_block_threshold(scores, labels)
    assert result.block_threshold == pytest.approx(unsafe.min())
    assert result.unsafe_recall == 1.0 and result.safe_block_rate == 0.0


@pytest.mark.parametrize("target,threshold", [(0.01, 0.995), (0.6, 0.5)])
def test_the_safe_block_target_binds(target, threshold):
    safe = np.arange(100) / 100  # 0.00 .. 0.99
    unsafe = np.array([0.995] * 50 + [0.5] * 50)
    scores, labels = np.concatenate([safe, unsafe]), np.array([SAFE] * 100 + [UNSAFE] * 100)
    result = calibrate_block_threshold(scores, labels, target_safe_block_rate=target)
    assert result.block_threshold == pytest.approx(threshold)
    assert result.safe_block_rate <= target


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.floats(0, 1), st.sampled_from([SAFE, REFUSAL, UNSAFE])), min_size=1, max_size=60),
       st.floats(0, 0.2))
def test_the_chosen_threshold_is_the_best_that_meets_the_target(rows, target):
    scores, labels = np.array([s for s, _ in rows]), np.array([lab for _, lab in rows])
    if not (labels == UNSAFE).any():
        return
    result = calibrate_block_threshold(scores, labels, target_safe_block_rate=target)
    assert result.safe_block_rate <= target + 1e-12
    for t in np.unique(scores):  # brute force over every threshold
        blocked = scores >= t
        safe_rate = blocked[labels == SAFE].mean() if (labels == SAFE).any() else 0.0
        tp = (blocked & (labels == UNSAFE)).sum()
        if safe_rate <= target + 1e-12 and tp:
            f1 = 2 * tp / (blocked.sum() + (labels == UNSAFE).sum())
            assert f1 <= result.unsafe_f1 + 1e-9


def test_grouped_split_keeps_each_prompt_on_one_side():
    rows = [(f"Prompt {i % 37}", i) for i in range(500)] + [("  prompt 3 ", -1)]
    train, held = grouped_split(rows, lambda r: r[0], 0.2)
    assert len(train) + len(held) == len(rows) and held and train
    assert not {prompt_key(p) for p, _ in train} & {prompt_key(p) for p, _ in held}
    assert grouped_split(rows, lambda r: r[0], 0.2) == (train, held)  # deterministic


def test_response_prefixes_are_word_prefixes():
    response = "one two three four five six seven eight nine ten"
    prefixes = response_prefixes(response, 3, random.Random(0))
    assert prefixes and all(response.startswith(p) and p != response for p in prefixes)
    assert all(len(p.split()) >= 2 for p in prefixes)
    assert response_prefixes("too short", 3, random.Random(0)) == []
