"""The state reader: a second stage over the served model's own tapped hidden states.

- one definition of its features: the engine's incremental pooling equals training's batch
  pooling, for every prefix a check may cover (hypothesis);
- in the engine, each verdict equals the reader applied to Hugging Face's own hidden states of
  the prompt and the tokens the check covers (fp32, tiny Llama);
- it fails closed when the engine passes no states, refuses a model, quantization or layer set
  it was not trained for, and refuses the input check (which judges text);
- its files: a missing or corrupt one is one error naming it;
- `train-reader` writes a reader that loads and serves.
"""

import json
import shutil

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

from oc_engine.errors import OcEngineError
from oc_engine.guard.pooled_states import AnswerStates, pool, pool_batch
from oc_engine.guard.probe import ModelFingerprint
from oc_engine.guard.state_reader import (CONFIG_FILE, WEIGHTS_FILE, ReaderConfig, StateReader, load_reader,
                                          save_reader)
from probe_helpers import fixed, guarded_run, make_probe, monitored

LABELS = ("safe_compliance", "safe_refusal", "unsafe_compliance")


def random_reader(model, layers, *, block=0.99, hidden=8, seed=0, tmp_path=None) -> StateReader:
    fingerprint = ModelFingerprint.of(model)
    config = ReaderConfig(model=fingerprint, layers=tuple(layers), hidden_size=fingerprint.hidden_size, labels=LABELS,
                          unsafe_label=2, allow_threshold=block, block_threshold=block)
    rng = np.random.default_rng(seed)
    size = config.feature_size
    tensors = {"mean": rng.normal(size=size).astype(np.float32) * 0.1,
               "scale": rng.uniform(0.5, 2, size).astype(np.float32),
               "w1": rng.normal(size=(hidden, size)).astype(np.float32) * 0.05,
               "b1": rng.normal(size=hidden).astype(np.float32), "w2": rng.normal(size=(3, hidden)).astype(np.float32),
               "b2": np.zeros(3, np.float32)}
    if tmp_path is None:
        return StateReader(".", config, tensors)
    save_reader(config, tensors, tmp_path)
    return load_reader(tmp_path)


# -- one definition of the features ---------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 12), min_size=1, max_size=5), recent=st.integers(1, 6),
       seed=st.integers(0, 2 ** 16))
def test_batch_pooling_equals_the_reference(lengths, recent, seed):
    g = torch.Generator().manual_seed(seed)
    features = torch.randn(len(lengths), 12, 2, 3, generator=g)
    batch = pool_batch(features, torch.tensor(lengths), recent).numpy()
    for row, length in enumerate(lengths):
        np.testing.assert_allclose(batch[row], pool(features[row, :length].numpy(), recent), rtol=1e-5, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 150), covers=st.data(), seed=st.integers(0, 2 ** 16))
def test_the_engine_pools_any_prefix_as_training_does(count, covers, seed):
    """A check may cover fewer tokens than have arrived (tokens decoded while an earlier check ran)."""
    rows = np.random.default_rng(seed).normal(size=(count, 2, 3)).astype(np.float32)
    states = AnswerStates()
    for row in rows:
        states.add(torch.from_numpy(row) if seed % 2 else row)
    n = covers.draw(st.integers(1, count))
    np.testing.assert_array_equal(states.features(n), pool(rows[:n]))
    with pytest.raises(ValueError):
        states.features(count + 1)  # never pools states it does not have


# -- in the engine ---------------------------------------------------------------------------
@pytest.mark.parametrize("compile,output_lag", [(False, 0), (False, 1), (True, 0)])  # lag 1: CUDA's default
def test_each_verdict_reads_the_states_hugging_face_computes(tiny, compile, output_lag):
    loaded = tiny("llama")
    taps = tuple(sorted(t % (loaded.model.config.num_hidden_layers + 1) for t in (-2, 1)))
    probe = make_probe(loaded.model, bias=20.0, layers=taps, pause=0.8, warn=0.5)  # pauses at every token
    reader = random_reader(loaded.model, taps)
    seqs, _ = guarded_run(loaded, probe, reader, ["w5 w6 w7", "w9 w8"], fixed(7), compile=compile,
                          output_lag=output_lag)
    for seq in seqs:
        verdicts = seq.completion.guard.verdicts
        assert verdicts and all(v.verdict == "allow" for v in verdicts)
        ids = seq.prompt_ids + seq.token_ids
        with torch.no_grad():
            hidden = loaded.model(torch.tensor([ids]), output_hidden_states=True).hidden_states
        start = len(seq.prompt_ids) - 1  # row j: the state that produced answer token j
        rows = torch.stack([hidden[t][0, start:start + len(seq.token_ids)] for t in taps], dim=1).numpy()
        for verdict in verdicts:
            expected = reader.judge_features(pool(rows[:verdict.covers]))["p_unsafe"]
            assert verdict.p_unsafe == pytest.approx(expected, abs=1e-4)


def test_a_reader_without_states_fails_closed(tiny):
    """An engine that passes no states (a token without its row) gets an error verdict: the held
    text is never released."""
    from oc_engine.guard.policy import PAUSE, GuardConfig
    from probe_helpers import summary

    loaded = tiny("llama")
    reader = random_reader(loaded.model, (1,))
    monitor = monitored(loaded.tokenizer, "w5", GuardConfig(), reader)
    monitor.seq.append_token(7, is_eos=False)
    monitor.on_token(7, 0.9, 0.9, PAUSE)  # no state
    monitor.poll()
    result = summary(monitor)
    assert [v["verdict"] for v in result["verdicts"]] == ["error"]
    assert result["status"] in ("blocked", "held") and monitor.text == ""


def test_a_reader_for_another_model_layer_set_or_quantization_is_refused(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.llm import LLM

    llama, qwen = tiny("llama"), tiny("qwen3")
    probe = make_probe(llama.model, bias=0.0, layers=(1,))
    setup = lambda reader, **kw: GuardSetup(probe=probe, classifier=reader, **kw)  # noqa: E731
    with pytest.raises(OcEngineError, match="trained for another model"):
        LLM(llama, EngineConfig(compile=False, max_model_len=64), setup(random_reader(qwen.model, (1,))))
    with pytest.raises(OcEngineError, match=r"reads layers \[2\] and the probe taps \[1\]"):
        LLM(llama, EngineConfig(compile=False, max_model_len=64), setup(random_reader(llama.model, (2,))))
    reader = random_reader(llama.model, (1,))
    fingerprint = ModelFingerprint.of(llama.model)
    with pytest.raises(OcEngineError, match="trained on the unquantized model and this one is int8"):
        reader.check_fingerprint(ModelFingerprint(**{**vars(fingerprint), "quantization": "int8"}), (1,))


def test_the_input_check_needs_a_text_classifier(tiny):
    from oc_engine.config import EngineConfig, GuardSetup
    from oc_engine.guard.policy import GuardConfig
    from oc_engine.llm import LLM

    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=0.0, layers=(1,))
    reader = random_reader(loaded.model, (1,))
    with pytest.raises(OcEngineError, match="input check judges the prompt as text"):
        LLM(loaded, EngineConfig(compile=False, max_model_len=64),
            GuardSetup(probe=probe, classifier=reader, policy=GuardConfig(input_check=True)))
    llm = LLM(loaded, EngineConfig(compile=False, max_model_len=64), GuardSetup(probe=probe, classifier=reader))
    with pytest.raises(OcEngineError, match="input check judges the prompt as text"):
        llm.add_request("w5", fixed(3), guard=GuardConfig(input_check=True))


# -- files -----------------------------------------------------------------------------------
def test_reader_files_load_and_every_fault_is_one_error(tiny, tmp_path):
    loaded = tiny("llama")
    good = tmp_path / "good"
    reader = random_reader(loaded.model, (1,), tmp_path=good)
    assert reader.config.layers == (1,) and reader.reads_states

    def spoiled(name, edit):
        target = tmp_path / name
        shutil.copytree(good, target)
        edit(target)
        return target

    cases = {
        "no-config": (lambda d: (d / CONFIG_FILE).unlink(), f"state reader file is missing: .*{CONFIG_FILE}"),
        "no-weights": (lambda d: (d / WEIGHTS_FILE).unlink(), f"state reader file is missing: .*{WEIGHTS_FILE}"),
        "bad-json": (lambda d: (d / CONFIG_FILE).write_text("{"), f"state reader file is corrupt: .*{CONFIG_FILE}"),
        "bad-weights": (lambda d: (d / WEIGHTS_FILE).write_bytes(b"\0" * 64),
                        f"state reader file is corrupt: .*{WEIGHTS_FILE}"),
        "format": (lambda d: _edit(d, format="x"), "not an oc-engine state reader"),
        "layers": (lambda d: _edit(d, layers=[1, 2]), r"mean has shape \(192,\), \(384,\) expected"),
        "threshold": (lambda d: _edit(d, block_threshold=2.0), "thresholds must satisfy"),
        "nan": (lambda d: _tensor(d, "b1", np.full(8, np.nan, np.float32)), "non-finite"),
        "missing-tensor": (lambda d: _tensor(d, "b2", None), "no b2"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(OcEngineError, match=message) as caught:
            load_reader(spoiled(name, edit))
        assert "\n" not in str(caught.value), name


def _edit(directory, **fields):
    config = json.loads((directory / CONFIG_FILE).read_text())
    config.update(fields)
    (directory / CONFIG_FILE).write_text(json.dumps(config))


def _tensor(directory, name, value):
    from safetensors.numpy import load_file

    tensors = load_file(str(directory / WEIGHTS_FILE))
    if value is None:
        del tensors[name]
    else:
        tensors[name] = value
    save_file(tensors, str(directory / WEIGHTS_FILE))


# -- training --------------------------------------------------------------------------------
def test_train_reader_writes_a_reader_that_serves(tiny, tmp_path):
    from oc_engine.training.probe_pipeline import ProbeJob
    from oc_engine.training.reader_training import ReaderTrainConfig, train_reader

    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=0.0, layers=(1,))
    data = tmp_path / "exchanges.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{20 + i} w9", "response": f"w{100 + i % 3} w101 w{7 + i % 2}",
                                        "label": [0, 1, 2][i % 3]}) + "\n" for i in range(60)))
    report = train_reader(loaded, probe, [(str(data), None)], tmp_path / "reader",
                          ProbeJob(max_response_tokens=8, validation=0.4, context_share=0.0),
                          ReaderTrainConfig(hidden=4, epochs=2, target_safe_block_rate=0.1), progress=False)
    assert report["calibration"]["safe_block_rate"] <= 0.1
    reader = load_reader(tmp_path / "reader")
    assert reader.config.block_threshold == report["calibration"]["block_threshold"]
    assert reader.config.model == ModelFingerprint.of(loaded.model) and reader.config.layers == (1,)
    seqs, _ = guarded_run(loaded, probe, reader, ["w5 w6"], fixed(4))
    assert seqs[0].completion.guard.status in ("completed", "blocked")


def test_the_joint_calibration_asks_the_reader_what_the_engine_would(tiny):
    """`calibrate-guard` answers each check of a replay from the teacher-forced states: the same
    p_unsafe the engine's check computes from the rows it kept."""
    from oc_engine.training.activations import Activations
    from oc_engine.training.guard_calibration import StateJudge

    loaded = tiny("llama")
    reader = random_reader(loaded.model, (1, 2))
    g = torch.Generator().manual_seed(0)
    features = torch.randn(3, 10, 2, reader.config.hidden_size, generator=g).to(torch.bfloat16)
    acts = Activations(features, torch.ones(3, 10, dtype=torch.bool), torch.zeros(3, dtype=torch.long), ["a"] * 3,
                       (1, 2))
    judge = StateJudge(reader, acts, [[5] * 10] * 3)
    judge.prefetch([(i, c) for i in range(3) for c in (0, 1, 4, 10)])
    for (i, covers), p in judge.cache.items():
        states = AnswerStates()
        for row in features[i]:
            states.add(row)
        expected = reader.judge_features(states.features(max(covers, 1)))["p_unsafe"]
        assert p == pytest.approx(expected, abs=1e-5)
