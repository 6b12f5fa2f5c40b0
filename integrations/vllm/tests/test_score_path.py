"""The score path without an engine: the shared-memory table, the logits processor's EMA and
hard stop, and the request driver against a scripted vLLM (a property: whatever the chunking
of vLLM's outputs, the verdicts' timing and the holes in the table, the guard shows what the
native engine's blocking design shows, and nothing held before a verdict covers it)."""

import asyncio
import concurrent.futures as cf
import math
import random
import time
from types import SimpleNamespace

import pytest
import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from oc_engine.engine.sequence import Sequence
from oc_engine.engine.text_stream import TextStream
from oc_engine.guard.monitor import SequenceMonitor
from oc_engine.guard.policy import GuardConfig
from oc_engine.kernels.probe_ema import ema_update, probe_ema_reference
from oc_engine.outputs import Finished, Refused, TextReleased
from oc_engine.params import SamplingParams
from oc_engine_vllm import step_scores
from oc_engine_vllm.llm import RowPool
from oc_engine_vllm.logits_processor import ProbeEmaLogitsProcessor, request_spec
from oc_engine_vllm.request_driver import MISSING, drive
from oc_engine_vllm.score_table import ScoreTable

ALPHA, WARN, PAUSE = 0.5, 0.4, 0.6


@pytest.fixture
def table():
    table = ScoreTable.create(4, 64)
    yield table
    table.close(unlink=True)


def spec(table, row, tag, eos=2):
    return {"oc_engine": {"table": table.path, "row": row, "tag": tag, "alpha": ALPHA, "warn": WARN,
                          "pause": PAUSE, "eos": eos}}


def test_a_row_claimed_by_a_new_request_hides_the_old_entries(table):
    table.claim(1, tag=7)
    table.write(1, 7, 0, 0.9, 0.9, 3)
    assert table.read(1, 7, 0) == (0.9, 0.9, 3)
    table.claim(1, tag=8)
    assert table.read(1, 8, 0) is None and table.read(1, 7, 0) is None
    assert math.isnan(table.previous_ema(1, 8, 1))  # a hole before token 1: flagged, never guessed
    assert table.previous_ema(1, 8, 0) == -1.0
    other = ScoreTable.open(table.path)  # the worker's view sees the caller's writes
    assert other.rows == 4 and other.max_len == 64
    table.stop(1, 8)
    assert other.stopped(1, 8) and not other.stopped(1, 7)
    other.close()


def test_a_malformed_request_setting_is_refused():
    assert request_spec(SimpleNamespace(extra_args=None)) is None
    with pytest.raises(ValueError, match="exactly the keys"):
        request_spec(SimpleNamespace(extra_args={"oc_engine": {"table": "x"}}))
    bad = {"table": "x", "row": 0, "tag": 1, "alpha": 0.5, "warn": 0.9, "pause": 0.5, "eos": 2}
    with pytest.raises(ValueError, match="warn <= pause"):
        request_spec(SimpleNamespace(extra_args={"oc_engine": bad}))
    with pytest.raises(ValueError, match="'row'.*must be int"):
        request_spec(SimpleNamespace(extra_args={"oc_engine": {**bad, "warn": 0.1, "row": "0"}}))


def test_the_processor_keeps_oc_engines_ema_per_request_across_moves(table):
    """Two requests in a batch that vLLM reorders: each row's EMA and flags equal the native
    kernel's reference over its own scores; a missing score is flagged and keeps the EMA."""
    processor = ProbeEmaLogitsProcessor(None, torch.device("cpu"), False)
    outputs = {5: [], 6: []}
    table.claim(0, 5)
    table.claim(1, 6)
    from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality

    processor.update_state(BatchUpdate(2, [], [(0, SimpleNamespace(extra_args=spec(table, 0, 5)), [], outputs[5]),
                                              (1, SimpleNamespace(extra_args=spec(table, 1, 6)), [], outputs[6])], []))
    rng = random.Random(0)
    series = {5: [], 6: []}
    order = [5, 6]
    for step in range(12):
        if step == 6:  # vLLM swaps the two rows
            processor.update_state(BatchUpdate(2, [], [], [(0, 1, MoveDirectionality.SWAP)]))
            order.reverse()
        scores = [rng.random() if step != 3 else float("nan") for _ in order]
        step_scores.publish(torch.tensor(scores))
        processor.apply(torch.zeros(2, 8))
        for row, tag in enumerate(order):
            series[tag].append(scores[row])
            outputs[tag].append(100 + step)  # the token vLLM sampled
    for tag, row in ((5, 0), (6, 1)):
        ema = torch.tensor([-1.0])
        for k, score in enumerate(series[tag]):
            hidden = torch.tensor([[[math.log(score / (1 - score)) if math.isfinite(score) else float("nan")]]])
            s, flags = probe_ema_reference(hidden, torch.ones(1, 1), torch.zeros(1), ema,
                                           torch.tensor([ALPHA, WARN, PAUSE]))
            got = table.read(row, tag, k)
            assert got is not None
            assert (math.isnan(got[0]) and math.isnan(float(s))) or got[0] == pytest.approx(float(s), abs=1e-6)
            assert got[1] == pytest.approx(float(ema), abs=1e-6) and got[2] == int(flags)
        assert table.read(row, tag, 3)[2] == 7  # the NaN step: every flag


def test_a_missing_score_count_is_a_pause_and_the_stop_flag_forces_eos(table):
    processor = ProbeEmaLogitsProcessor(None, torch.device("cpu"), False)
    from vllm.v1.sample.logits_processor import BatchUpdate

    table.claim(2, 9)
    processor.update_state(BatchUpdate(1, [], [(0, SimpleNamespace(extra_args=spec(table, 2, 9, eos=3)), [], [])],
                                       []))
    step_scores.publish(torch.tensor([0.1, 0.2]))  # two scores for one row: not this batch's
    processor.apply(torch.zeros(1, 8))
    assert table.read(2, 9, 0)[2] == 7
    table.stop(2, 9)
    step_scores.publish(torch.tensor([0.1]))
    logits = processor.apply(torch.zeros(1, 8))
    assert logits[0].argmax() == 3 and torch.isinf(logits[0, :3]).all()


def test_requests_without_oc_engine_settings_are_left_alone():
    processor = ProbeEmaLogitsProcessor(None, torch.device("cpu"), False)
    from vllm.v1.sample.logits_processor import BatchUpdate

    processor.update_state(BatchUpdate(1, [], [(0, SimpleNamespace(extra_args=None), [], [])], []))
    logits = torch.randn(1, 8)
    assert torch.equal(processor.apply(logits.clone()), logits)
    assert not processor.is_argmax_invariant()  # or vLLM would skip it for greedy requests


# -- the request driver against a scripted vLLM ------------------------------------------
class ScriptedVllm:
    """Streams fixed tokens in chunks after small real delays, writing each token's score and
    EMA into the table first (as the worker does), except where told to leave a hole."""

    errored = False

    def __init__(self, table, tokens, scores, chunks, holes, delays):
        self.table, self.tokens, self.scores, self.chunks, self.holes, self.delays = \
            table, tokens, scores, chunks, holes, delays
        self.aborted = False

    async def generate(self, prompt, params, request_id):
        s = params.extra_args["oc_engine"] if params.extra_args else None
        i = 0
        for n, size in enumerate(self.chunks):
            batch = self.tokens[i:i + size]
            if not batch or self.aborted:
                return
            for k in range(i, i + len(batch)):
                if k in self.holes or s is None:
                    continue
                previous = torch.tensor([self.table.previous_ema(s["row"], s["tag"], k)])
                ema, flags = ema_update(torch.tensor([self.scores[k]]), previous, ALPHA, WARN, PAUSE)
                self.table.write(s["row"], s["tag"], k, self.scores[k], float(ema), int(flags))
            i += len(batch)
            await asyncio.sleep(self.delays[n % len(self.delays)])
            yield SimpleNamespace(outputs=[SimpleNamespace(token_ids=batch,
                                                           finish_reason="length" if i >= len(self.tokens) else None)])

    async def abort(self, request_id):
        self.aborted = True


class DelayedClassifier:
    """Answers check k with verdicts[k] after delays[k] seconds, on a thread (like the real one)."""

    def __init__(self, verdicts, delays):
        self.verdicts, self.delays, self.calls = verdicts, delays, 0
        self.pool = cf.ThreadPoolExecutor(2)

    def submit(self, prompt, response, urgent=False, judged_chars=0):
        verdict, delay = self.verdicts[self.calls % len(self.verdicts)], self.delays[self.calls % len(self.delays)]
        self.calls += 1

        def answer():
            import time
            time.sleep(delay)
            if verdict == "raise":
                raise RuntimeError("injected")
            return {"verdict": verdict, "p_unsafe": 0.5}
        return self.pool.submit(answer)


class ImmediateClassifier(DelayedClassifier):
    def submit(self, prompt, response, urgent=False, judged_chars=0):
        future = super().submit(prompt, response, urgent, judged_chars)
        future.exception()  # resolved before the guard polls: the blocking design
        return future


def reference(tokenizer, tokens, entries, config, verdicts):
    """The native engine's view with instant verdicts: token by token, each verdict delivered
    before the next token (what the blocking design shows)."""
    classifier = ImmediateClassifier(verdicts, [0.0])
    limit = max(1, len(tokens))  # an input check may block before any token
    seq = Sequence(request_id="r", prompt_ids=[1, 2], params=SamplingParams(max_tokens=limit, ignore_eos=True),
                   key=0, limit=limit, stream=TextStream(tokenizer, ()))
    monitor = seq.guard = SequenceMonitor(seq, "a prompt", config, classifier)
    monitor.start()
    monitor.poll()
    for k, token in enumerate(tokens):
        if not monitor.wants_tokens:
            break
        seq.append_token(token, is_eos=False)
        monitor.on_token(token, *entries[k])
        if k == len(tokens) - 1:
            monitor.on_finish()
        monitor.poll()
    while monitor.pending is not None:
        monitor.pending.future.exception()
        monitor.poll()
    monitor.finish()
    shown = "".join(e.text for e in monitor.take_events() if isinstance(e, (TextReleased, Refused)))
    return monitor.report(), shown


# No shrinking: a failing example may wait out a verdict deadline, and shrinking would rerun it
# many times; the example as found is reported.
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture],
          phases=[Phase.explicit, Phase.reuse, Phase.generate])
@given(data=st.data())
def test_the_driver_shows_what_the_blocking_design_shows(tokenizer, data):
    n = data.draw(st.integers(1, 20))
    tokens = data.draw(st.lists(st.integers(300, 5000), min_size=n, max_size=n))
    scores = data.draw(st.lists(st.sampled_from([0.1, 0.2, 0.9, float("nan")]), min_size=n, max_size=n))
    chunks = data.draw(st.lists(st.integers(1, 4), min_size=n, max_size=n))
    holes = set(data.draw(st.lists(st.integers(0, n - 1), max_size=2)))
    verdicts = data.draw(st.lists(st.sampled_from(["allow", "allow", "block", "uncertain", "raise"]), min_size=1,
                                  max_size=6))
    check_delays = data.draw(st.lists(st.sampled_from([0.0, 0.002, 0.01]), min_size=1, max_size=4))
    config = GuardConfig(every=data.draw(st.integers(1, 3)), max_held=data.draw(st.integers(1, 6)),
                         final_check=data.draw(st.booleans()), input_check=data.draw(st.booleans()),
                         uncertain=data.draw(st.sampled_from(["final", "block"])), deadline_s=8.0, refusal="NO")
    table = ScoreTable.create(2, 32)
    try:
        vllm = ScriptedVllm(table, tokens, scores, chunks, holes, data.draw(st.lists(
            st.sampled_from([0.0, 0.001, 0.005]), min_size=1, max_size=3)))
        classifier = DelayedClassifier(verdicts, check_delays)
        backend = SimpleNamespace(table=table, vllm=vllm, eos_ids={2}, probe=object(), next_tag=lambda: 11,
                                  vllm_params=lambda seq, row, tag: SimpleNamespace(extra_args=spec(table, row, tag)))
        seq = Sequence(request_id="r", prompt_ids=[1, 2], params=SamplingParams(max_tokens=n, ignore_eos=True),
                       key=0, limit=n, stream=TextStream(tokenizer, ()))
        seq.guard = SequenceMonitor(seq, "a prompt", config, classifier)
        events = []

        async def run():
            backend.rows = RowPool(2)
            await drive(backend, seq, lambda _s, batch: events.extend(batch))
        started = time.monotonic()
        asyncio.run(run())
        # Liveness, not speed: every verdict here arrives within 10 ms, so a run that lasts
        # anywhere near the 8 s deadline slept through a verdict (a lost wake-up).
        assert time.monotonic() - started < config.deadline_s / 2
        # What the guard was fed: the table's entry for each token, a hole read as non-finite.
        entries = [(table.read(0, 11, k) or table.read(1, 11, k) or MISSING) for k in range(len(seq.token_ids))]
        expected, expected_shown = reference(tokenizer, seq.token_ids, entries, config, verdicts)
    finally:
        table.close(unlink=True)
    shown = "".join(e.text for e in events if isinstance(e, (TextReleased, Refused)))
    report = seq.completion.guard
    assert isinstance(events[-1], Finished)
    assert (report.status, report.pause_points, report.released_tokens) == \
        (expected.status, expected.pause_points, expected.released_tokens)
    assert [(v.verdict, v.covers, v.final, v.input) for v in report.verdicts] == \
        [(v.verdict, v.covers, v.final, v.input) for v in expected.verdicts]
    assert shown == expected_shown


def test_an_unguarded_request_streams_every_token_without_a_table(tokenizer):
    """--no-guard on vLLM: no probe, no score table; the text streams as vLLM makes it."""
    tokens = [tokenizer.encode(" hello")[0], tokenizer.encode(" world")[0]] * 3
    vllm = ScriptedVllm(None, tokens, [0.1] * 6, [2, 1, 3], set(), [0.0])
    backend = SimpleNamespace(table=None, vllm=vllm, eos_ids={2}, probe=None, next_tag=lambda: 1,
                              vllm_params=lambda seq, row, tag: SimpleNamespace(extra_args=None))
    seq = Sequence(request_id="r", prompt_ids=[1], params=SamplingParams(max_tokens=6, ignore_eos=True), key=0,
                   limit=6, stream=TextStream(tokenizer, ()))
    events = []

    async def run():
        backend.rows = RowPool(1)
        await drive(backend, seq, lambda _s, batch: events.append(batch))
    asyncio.run(run())
    text = "".join(e.text for batch in events for e in batch if isinstance(e, TextReleased))
    assert text == tokenizer.decode(tokens) and seq.completion.finish_reason == "length"
    assert len(events) > 2  # streamed in pieces, not at the end
    assert seq.scores == []


@pytest.mark.parametrize("guarded", [True, False], ids=["guarded", "unguarded"])
def test_engine_args_make_a_valid_vllm_model_config(model_dir, guarded):
    """The arguments `VllmLLM` gives vLLM pass vLLM's own validation (without starting it)."""
    from transformers import AutoConfig

    from oc_engine.models.embedded import default_probe_dir
    from oc_engine_vllm.llm import engine_args

    config = AutoConfig.from_pretrained(model_dir)
    args = engine_args(model_dir, config, probe_dir=default_probe_dir() if guarded else None, dtype="float32",
                       max_num_seqs=2, max_model_len=256)
    model_config = args.create_model_config()
    assert model_config.max_model_len == 256
    architecture = model_config.hf_config.architectures[0]
    assert architecture == ("OcEngineProbeLlamaForCausalLM" if guarded else "LlamaForCausalLM")
    assert (args.logits_processors is not None) == guarded

