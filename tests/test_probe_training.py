"""Probe training: collection positions, the EMA objective, calibration, and the whole command."""

import json

import numpy as np
import pytest
import torch

from oc_engine.config import EngineConfig, GuardSetup
from oc_engine.data import Exchange
from oc_engine.errors import OcEngineError
from oc_engine.llm import LLM
from oc_engine.training.activations import Activations, CollectSpec, collect
from oc_engine.training.probe_calibration import calibrate_probe, replay_pauses
from probe_helpers import fixed, plain_llm
from oc_engine.training.probe_training import ProbeTrainConfig, auroc, ema_traces, exchange_scores, fit_probe


@pytest.mark.slow
def test_collected_states_are_the_ones_generation_scores(embedded_fp32):
    """Teacher-forcing a generated answer taps exactly the states the decode step tapped."""
    from oc_engine.engine.prompts import render_prompt

    loaded = embedded_fp32
    llm = plain_llm(loaded, tap=(-4, 10))
    prompts = ["What is the capital of France?", "Name three colours."]
    ids = [render_prompt(loaded.tokenizer, p) for p in prompts]
    results = llm.run(ids, fixed(6), collect_taps=True)
    exchanges = [Exchange(p, loaded.tokenizer.decode(r.token_ids), 0) for p, r in zip(prompts, results)]
    spec = CollectSpec(layers=llm.runner.taps, mode="tokens", max_response_tokens=6)
    acts = collect(loaded.model, loaded.tokenizer, exchanges, spec, batch_size=2, cache=False, progress=False)
    for row, result in enumerate(results):
        assert acts.mask[row].sum() == 6
        for j, tapped in enumerate(result.taps):  # tapped [L, H]: the state that produced response token j
            torch.testing.assert_close(acts.features[row, j].float(), tapped.to(torch.bfloat16).float(),
                                       atol=0.05, rtol=0.02)


def test_batch_equals_single_under_padding(tiny):
    loaded = tiny("qwen3")
    words = [" ".join(f"w{i}" for i in range(5, 5 + n)) for n in (3, 11, 6)]
    exchanges = [Exchange(f"w{40 + k} w41", words[k], k % 3) for k in range(3)]
    spec = CollectSpec(layers=(1, 3), mode="tokens", max_response_tokens=8, chat_template=False)
    batch = collect(loaded.model, loaded.tokenizer, exchanges, spec, batch_size=3, cache=False, progress=False)
    for i, exchange in enumerate(exchanges):
        alone = collect(loaded.model, loaded.tokenizer, [exchange], spec, batch_size=1, cache=False, progress=False)
        # The batch is as wide as its longest response kept; alone, as wide as this one.
        width = alone.mask.shape[1]
        assert torch.equal(batch.mask[i, :width], alone.mask[0]) and not batch.mask[i, width:].any()
        torch.testing.assert_close(batch.features[i, :width], alone.features[0], atol=2e-2, rtol=1e-2)
    final = collect(loaded.model, loaded.tokenizer, exchanges, CollectSpec(layers=(3,), mode="final",
                                                                          chat_template=False),
                    cache=False, progress=False)
    assert final.features.shape[:2] == (3, 1) and bool(final.mask.all())


def _synthetic(n=200, tokens=12, hidden=16, seed=0, shift=1.5):
    """Unsafe exchanges drift along one direction from their 4th token on; others don't."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.tensor([2 if i % 3 == 0 else i % 3 - 1 for i in range(n)])
    x = torch.randn(n, tokens, 1, hidden, generator=g)
    direction = torch.zeros(hidden)
    direction[3] = 1.0
    x[labels == 2, 3:, 0] += shift * direction
    lengths = torch.randint(6, tokens + 1, (n,), generator=g)
    mask = torch.arange(tokens)[None] < lengths[:, None]
    return Activations(x.to(torch.bfloat16), mask, labels, [f"p{i}" for i in range(n)], (5,))


def test_a_probe_on_separable_activations_reaches_the_known_accuracy():
    train, val = _synthetic(seed=0, shift=3.0), _synthetic(seed=1, shift=3.0)
    weight, bias = fit_probe(train, ProbeTrainConfig(alpha=0.3, steps=200, learning_rate=5e-2))
    unsafe = val.labels.numpy() == 2
    trained = auroc(exchange_scores(val, weight, bias, 0.3), unsafe)
    oracle_weight = torch.zeros(1, 16)
    oracle_weight[0, 3] = 2.0  # the direction the data was built with
    oracle = auroc(exchange_scores(val, oracle_weight, torch.tensor([-3.0]), 0.3), unsafe)
    assert oracle > 0.98 and trained >= oracle - 0.02
    assert weight[0].abs().argmax() == 3  # it found the direction


def test_a_probe_started_from_another_keeps_it_and_can_improve_it():
    train, val = _synthetic(seed=0, shift=3.0), _synthetic(seed=1, shift=3.0)
    start_weight = torch.randn(1, 16, generator=torch.Generator().manual_seed(3)) * 0.1
    start_bias = torch.tensor([0.5])
    # (almost) no steps: the start comes back, through the standardisation and back
    weight, bias = fit_probe(train, ProbeTrainConfig(steps=1, learning_rate=1e-9), init=(start_weight, start_bias))
    assert torch.allclose(weight, start_weight, atol=1e-5) and torch.allclose(bias, start_bias, atol=1e-4)
    unsafe = val.labels.numpy() == 2
    weight, bias = fit_probe(train, ProbeTrainConfig(alpha=0.3, steps=200, learning_rate=5e-2),
                             init=(start_weight, start_bias))
    assert auroc(exchange_scores(val, weight, bias, 0.3), unsafe) > 0.98


def test_the_ema_matches_the_kernel_reference():
    from oc_engine.kernels.probe_ema import probe_ema_reference

    acts = _synthetic(n=4)
    weight, bias = torch.randn(1, 16), torch.tensor([0.1])
    logits = torch.einsum("etlh,lh->et", acts.features.float(), weight) + bias
    traces = ema_traces(logits, torch.ones_like(acts.mask), 0.4)
    ema = torch.full((4,), -1.0)
    for t in range(acts.features.shape[1]):
        probe_ema_reference(acts.features[:, t].float().permute(1, 0, 2), weight, bias, ema,
                            torch.tensor([0.4, 0.5, 0.9]))
        torch.testing.assert_close(traces[:, t], ema)


def test_calibration_meets_its_target_on_synthetic_streams():
    val = _synthetic(n=600, seed=3, shift=3.0)
    weight = torch.zeros(1, 16)
    weight[0, 3] = 2.0
    result = calibrate_probe(val, weight, torch.tensor([-2.0]), target=0.02)
    assert result.benign_pause_rate <= 0.02
    assert result.detection_rate > 0.9
    assert result.median_tokens_to_detection is not None and result.median_tokens_to_detection >= 3
    assert 0 <= result.warn <= result.pause <= 1


def test_replay_pauses_at_the_first_crossing():
    traces = np.array([[0.1, 0.2, 0.9, 0.95], [0.1, 0.1, 0.1, 0.1]])
    assert replay_pauses(traces, np.ones_like(traces, dtype=bool), 0.5, 0.8) == [2, None]


def test_train_probe_end_to_end_on_a_tiny_model(tiny, tmp_path, monkeypatch):
    from oc_engine.guard.probe import load_probe
    from oc_engine.training.probe_pipeline import ProbeJob, train_probe

    monkeypatch.setenv("OC_ENGINE_CACHE", str(tmp_path / "cache"))
    loaded = tiny("llama")
    rows = []
    for i in range(90):
        label = (0, 1, 2)[i % 3]
        words = {0: "w200 w201 w202 w203", 1: "w300 w301", 2: "w100 w101 w102 w103 w104"}[label]
        rows.append({"prompt": f"w{20 + i} w9", "response": f"{words} w{400 + i % 7}", "label": label})
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = ProbeJob(layers=(-2,), max_response_tokens=8, validation=0.3, batch_size=16)
    report = train_probe(loaded, [(str(data), None)], tmp_path / "probe", job,
                         ProbeTrainConfig(steps=100, learning_rate=5e-2), progress=False)
    assert report["validation_auroc"] > 0.9
    probe = load_probe(tmp_path / "probe")
    assert probe.config.pause == pytest.approx(report["calibration"]["pause"])
    assert list((tmp_path / "cache" / "activations").iterdir())  # cached for the next run
    with pytest.raises(OcEngineError, match="trained for another model"):
        LLM(tiny("qwen3"), EngineConfig(compile=False), GuardSetup(probe=probe, classifier=None))


def test_prompt_files_need_a_prompt_label(tmp_path):
    from oc_engine.training.onpolicy import read_labelled_prompts, rule_label

    bad = tmp_path / "prompts.jsonl"
    bad.write_text('{"prompt": "a", "prompt_label": "harmful"}\n{"prompt": "b"}\n')
    with pytest.raises(OcEngineError, match=r"prompts.jsonl:2: missing field 'prompt_label'"):
        read_labelled_prompts(bad)
    assert rule_label("harmful", "I'm sorry, I can't help") == 1
    assert rule_label("harmful", "Sure, step one") == 2
    assert rule_label("benign", "Paris.") == 0
