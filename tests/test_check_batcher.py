"""The classifier's worker runs queued checks as one batch: same answers, cancels honoured."""

import threading

import numpy as np
import pytest

from oc_engine.guard.check_batcher import CheckBatcher, pad


def _gated_batcher():
    """A batcher whose first call waits for `gate`, so later checks queue up behind it."""
    gate, entered, calls = threading.Event(), threading.Event(), []

    def run(batch, urgent):
        calls.append((batch["input_ids"].copy(), urgent))
        if len(calls) == 1:
            entered.set()
            gate.wait(5)
        return batch["input_ids"][:, :1].astype(np.float32) * 10  # [B, 1]: its first token id, times 10

    return CheckBatcher(run, pad_id=0), gate, entered, calls


def test_checks_queued_while_the_worker_is_busy_run_as_one_padded_batch():
    batcher, gate, entered, calls = _gated_batcher()
    first = batcher.submit({"input_ids": [1], "attention_mask": [1]})
    assert entered.wait(5)
    rest = [batcher.submit({"input_ids": [i] * i, "attention_mask": [1] * i}, urgent=i == 3) for i in range(2, 6)]
    gate.set()
    assert first.result(5)[0] == 10 and [f.result(5)[0] for f in rest] == [20, 30, 40, 50]
    assert batcher.batch_sizes == [1, 4]
    ids, urgent = calls[1]
    assert ids.shape == (4, 5) and ids[0].tolist() == [2, 2, 0, 0, 0] and urgent  # one urgent: all run urgent
    batcher.close()


def test_a_cancelled_check_is_dropped_and_a_failing_batch_fails_every_check():
    batcher, gate, entered, calls = _gated_batcher()
    busy = batcher.submit({"input_ids": [1], "attention_mask": [1]})
    assert entered.wait(5)
    dropped = batcher.submit({"input_ids": [2], "attention_mask": [1]})
    kept = batcher.submit({"input_ids": [3], "attention_mask": [1]})
    assert dropped.cancel()
    gate.set()
    assert busy.result(5)[0] == 10 and kept.result(5)[0] == 30
    assert [c[0].tolist() for c in calls[1:]] == [[[3]]]

    def boom(batch, urgent):
        raise RuntimeError("boom")

    failing = CheckBatcher(boom, pad_id=0)
    futures = [failing.submit({"input_ids": [1], "attention_mask": [1]}) for _ in range(3)]
    for f in futures:
        with pytest.raises(RuntimeError, match="boom"):
            f.result(5)
    for b in (batcher, failing):
        b.close()


def test_pad_fills_ids_with_the_pad_id_and_the_rest_with_zero():
    out = pad([{"input_ids": [5, 6], "token_type_ids": [1, 1]}, {"input_ids": [7], "token_type_ids": [1]}], 9)
    assert out["input_ids"].tolist() == [[5, 6], [7, 9]] and out["token_type_ids"].tolist() == [[1, 1], [1, 0]]


@pytest.mark.parametrize("inline", [False, True])
def test_batched_verdicts_equal_single_calls(tiny_classifier, inline):
    from oc_engine.guard.classifier import ExchangeClassifier

    classifier = ExchangeClassifier(tiny_classifier[1], inline=inline)
    pairs = [(f"w{5 + i} w6", " ".join(f"w{20 + j}" for j in range(i))) for i in range(12)]
    futures = [classifier.submit(p, r) for p, r in pairs]
    classifier.drain()  # inline: all twelve run now, as one batch
    batched = [f.result(30)["p_unsafe"] for f in futures]
    if inline:
        assert classifier._batcher.batch_sizes == [12]
    single = [classifier.judge(p, r)["p_unsafe"] for p, r in pairs]
    classifier.close()
    np.testing.assert_allclose(batched, single, atol=1e-5)
