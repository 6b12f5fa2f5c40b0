"""The CLI: JSON output for scripts, one-line errors with a non-zero exit."""

import json

import pytest
from click.testing import CliRunner

from oc_engine.cli import main


@pytest.mark.slow
def test_generate_json_with_the_embedded_model(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "What is 2+2?"}\n{"prompt": "Name a fruit."}\n')
    result = CliRunner().invoke(main, ["generate", "--prompts-file", str(prompts), "--max-new-tokens", "8",
                                       "--no-compile", "--dtype", "float32", "--json", "--no-guard"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["index"] for r in rows] == [0, 1]
    for row in rows:
        assert row["finish_reason"] in ("eos", "length") and 1 <= len(row["token_ids"]) <= 8
        assert row["model"].endswith("SmolLM2-135M-Instruct") and row["dtype"] == "float32"
        assert {"text", "prefill_ms", "ttft_ms", "decode_tokens_per_s", "prompt_tokens"} <= row.keys()


@pytest.mark.slow
def test_generate_streams_text(tmp_path):
    result = CliRunner().invoke(main, ["generate", "--prompt", "Say hello", "--max-new-tokens", "6",
                                       "--no-compile", "--dtype", "float32", "--no-guard"])
    assert result.exit_code == 0 and result.stdout.strip()


@pytest.mark.slow
def test_the_embedded_model_is_guarded_by_its_shipped_probe():
    from oc_engine.guard.probe import load_probe
    from oc_engine.models.embedded import default_probe_dir

    # (conftest hides any default classifier: a pause blocks)
    probe = load_probe(default_probe_dir())
    assert (default_probe_dir() / "probe.safetensors").stat().st_size < 64 * 1024  # kilobytes, in the package
    result = CliRunner().invoke(main, ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens",
                                       "8", "--no-compile", "--json", "--pause", "1.0", "--warn", "1.0"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["status"] == "completed" and row["pause_points"] == []
    blocked = CliRunner().invoke(main, ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens",
                                        "8", "--no-compile", "--json", "--pause", "0.0", "--warn", "0.0",
                                        "--every", "1"])
    row = json.loads(blocked.stdout)
    assert row["status"] == "blocked" and row["pause_points"] == [0] and probe.config.layers


@pytest.mark.parametrize("second_stage", ["default", "embedded:encoder"])
def test_the_embedded_model_is_guarded_by_both_shipped_stages(monkeypatch, second_stage):
    """No build step: the embedded model's state reader ships ready; the encoder delta is merged
    and exported on first use (into the user cache, like the converted model). A non-streaming
    answer gets its final check."""
    import oc_engine.models.defaults as defaults
    from oc_engine.models.embedded import default_classifier_delta_dir

    monkeypatch.undo()  # the shipped stages, as a user gets them
    assert defaults.default_classifier_delta() == default_classifier_delta_dir()
    extra = [] if second_stage == "default" else ["--classifier", second_stage]
    # A pause every 4 tokens: checks at tokens 4 and 8, then the final check of all 10.
    result = CliRunner().invoke(main, ["generate", "--prompt", "What is the capital of France?", "--max-new-tokens",
                                       "10", "--ignore-eos", "--no-compile", "--json", "--pause", "0.0", "--warn", "0.0",
                                       "--every", "4", *extra])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout)
    assert row["status"] == "completed" and row["verdicts"][-1]["final"] and row["verdicts"][-1]["verdict"] == "allow"
    assert [v["covers"] for v in row["verdicts"]] == [4, 8, 10]  # the pauses were judged too, and allowed
    assert "Paris" in row["text"] and row["first_text_ms"] >= row["ttft_ms"]


def test_the_default_second_stage_follows_the_model(monkeypatch):
    """The state reader for the unquantized embedded model; the model-agnostic encoder for any
    other model (or a quantized one) until a reader is trained for it."""
    from oc_engine.guard.state_reader import StateReader
    from oc_engine.models import defaults
    from oc_engine.models.embedded import default_reader_dir

    monkeypatch.undo()
    monkeypatch.setattr(defaults, "default_classifier_delta", lambda: None)  # no encoder: see what is chosen

    reader = defaults.resolve_classifier(None, "cpu", model_is_embedded=True)
    assert isinstance(reader, StateReader) and reader.path == default_reader_dir()
    assert reader.config.layers == (17, 19)
    named = defaults.resolve_classifier(defaults.EMBEDDED_READER, "cpu")
    assert isinstance(named, StateReader)
    # without the encoder the other cases have no second stage
    assert defaults.resolve_classifier(None, "cpu", model_is_embedded=False) is None
    assert defaults.resolve_classifier(None, "cpu", model_is_embedded=True, quantized=True) is None


@pytest.mark.parametrize("args,message", [
    (["--prompt", "a", "--prompts-file", "x"], "exactly one of --prompt or --prompts-file"),
    ([], "exactly one of --prompt or --prompts-file"),
    (["--prompt", "a", "--model", "/does/not/exist"], "model not found"),
    (["--prompt", "a", "--top-p", "0"], "--top-p"),
])
def test_generate_errors_are_one_line(args, message):
    result = CliRunner().invoke(main, ["generate", *args])
    assert result.exit_code != 0
    assert message in result.output
    assert "Traceback" not in result.output


def test_bad_prompts_file_line_is_reported(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "fine"}\n{"prompt": \n')
    result = CliRunner().invoke(main, ["generate", "--prompts-file", str(bad), "--no-compile"])
    assert result.exit_code == 1
    assert f"{bad}:2: not valid JSON" in result.output


@pytest.fixture(scope="module")
def guarded_setup(tiny_model_dir, tiny_classifier):
    """A tiny model directory, a probe for it that always pauses, and a classifier export."""
    return tiny_model_dir(20.0), tiny_classifier[1]


def test_guarded_generate_json_trace_and_plot(guarded_setup):
    root, classifier = guarded_setup
    base = ["generate", "--model", str(root / "model"), "--prompt", "w5 w6 w7", "--no-chat-template",
            "--no-compile", "--dtype", "float32", "--max-new-tokens", "6", "--probe", str(root / "probe")]
    result = CliRunner().invoke(main, [*base, "--classifier", str(classifier), "--json",
                                       "--trace", str(root / "trace.jsonl")])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[-1])
    assert row["status"] in ("completed", "blocked") and row["pause_points"][0] == 0
    assert row["verdicts"] and {"verdict", "p_unsafe", "latency_ms", "covers"} <= row["verdicts"][0].keys()
    trace = [json.loads(line) for line in (root / "trace.jsonl").read_text().splitlines()]
    assert trace[0]["events"][0]["event"] == "pause" and {"score", "ema", "state", "token"} <= trace[0].keys()
    traced_verdicts = [e for r in trace for e in r["events"] if e["event"] == "verdict"]
    assert [e["covers"] for e in traced_verdicts] == [v["covers"] for v in row["verdicts"]]
    plotted = CliRunner().invoke(main, ["plot-trace", str(root / "trace.jsonl"), "-o", str(root / "risk.png")])
    assert plotted.exit_code == 0 and (root / "risk.png").stat().st_size > 1000

    # The same run again: the same decisions, whatever the machine's timing did meanwhile.
    again = CliRunner().invoke(main, [*base, "--classifier", str(classifier), "--json"])
    again_row = json.loads(again.stdout.splitlines()[-1])

    def decisions(r):
        return (r["status"], r["text"], r["pause_points"], [(v["covers"], v["verdict"], v["p_unsafe"])
                                                             for v in r["verdicts"]])
    assert decisions(again_row) == decisions(row)

    refused = CliRunner().invoke(main, [*base, "--refusal", "NOPE"])  # no classifier: fail closed
    assert refused.exit_code == 0 and refused.stdout.strip() == "NOPE"


def test_a_refusal_after_released_text_starts_on_its_own_line(guarded_setup):
    """--every 3: tokens 0 and 1 are released before the pause at token 2, then (no classifier)
    the answer is blocked: the refusal follows on a new line, and --json keeps the two apart."""
    root, _ = guarded_setup
    base = ["generate", "--model", str(root / "model"), "--prompt", "w5 w6 w7", "--no-chat-template",
            "--no-compile", "--dtype", "float32", "--max-new-tokens", "6", "--probe", str(root / "probe"),
            "--every", "3", "--refusal", "NOPE"]
    row = json.loads(CliRunner().invoke(main, [*base, "--json"]).stdout)
    assert row["status"] == "blocked" and row["pause_points"] == [2] and row["refusal"] == "NOPE"
    assert row["text"] and "NOPE" not in row["text"] and len(row["token_ids"]) == 2
    streamed = CliRunner().invoke(main, base)
    assert streamed.exit_code == 0 and streamed.stdout == f"{row['text']}\nNOPE\n"
    two = root.parent / "two-prompts.txt"
    two.write_text("w5 w6 w7\nw8 w9\n")
    batch = CliRunner().invoke(main, [*base[:3], *base[5:], "--prompts-file", str(two)])
    assert f"{row['text']}\nNOPE" in batch.stdout


def test_trace_keeps_withheld_tokens_out_unless_asked(guarded_setup, tmp_path):
    """No classifier: the probe pauses at the first token and the answer is blocked, so every
    token was withheld. The trace has their scores but not their ids, unless --trace-held."""
    root, _ = guarded_setup
    base = ["generate", "--model", str(root / "model"), "--prompt", "w5 w6 w7", "--no-chat-template", "--no-compile",
            "--dtype", "float32", "--max-new-tokens", "6", "--probe", str(root / "probe"), "--max-held", "3"]
    for extra, held in (([], False), (["--trace-held"], True)):
        trace_file = tmp_path / f"trace-{held}.jsonl"
        result = CliRunner().invoke(main, [*base, "--trace", str(trace_file), *extra])
        assert result.exit_code == 0, result.output
        rows = [json.loads(line) for line in trace_file.read_text().splitlines()]
        assert rows and all(r["score"] is not None for r in rows)
        if held:
            assert all(isinstance(r["token"], int) and "withheld" not in r for r in rows)
        else:
            assert all(r["token"] is None and r["withheld"] for r in rows)


def test_probe_for_another_model_is_a_one_line_error(guarded_setup):
    root, _ = guarded_setup
    result = CliRunner().invoke(main, ["generate", "--prompt", "hi", "--no-compile", "--probe", str(root / "probe"),
                                       "--dtype", "float32"])
    assert result.exit_code == 1 and "trained for another model" in result.output


def test_collect_and_eval_commands(guarded_setup, tmp_path):
    """collect writes labelled on-policy answers; eval replays them and runs live, failing closed."""
    import shutil

    from transformers import AutoTokenizer

    root, _ = guarded_setup
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"w{5 + i} w6 w7", "prompt_label": label}) + "\n"
                               for i, label in enumerate(["harmful", "benign", "harmful"])))
    answers = tmp_path / "answers.jsonl"
    result = CliRunner().invoke(main, ["collect", "--prompts", str(prompts), "--out", str(answers), "--model",
                                       str(root / "model"), "--max-num-seqs", "2", "--max-new-tokens", "4"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    assert [r["label"] for r in rows] == [2, 0, 2]  # the tiny model never says "I'm sorry"
    assert all(r["source"].startswith("onpolicy:") for r in rows)
    again = CliRunner().invoke(main, ["collect", "--prompts", str(prompts), "--out", str(answers), "--model",
                                      str(root / "model")])
    assert again.exit_code == 1 and "already exists" in again.output
    chat_model = tmp_path / "chat-model"  # the tiny model, given a chat template to answer conversations
    shutil.copytree(root / "model", chat_model)
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    tokenizer.save_pretrained(chat_model)
    chats = tmp_path / "chats.jsonl"  # a live row may be a conversation (a request split over turns)
    chats.write_text(json.dumps({"prompt": "w5 w6", "prompt_label": "harmful", "source": "split", "messages": [
        {"role": "user", "content": "w5"}, {"role": "assistant", "content": "w9"},
        {"role": "user", "content": "w6"}]}) + "\n")
    result = CliRunner().invoke(main, ["eval", "--model", str(chat_model), "--probe", str(root / "probe"),
                                       "--no-classifier", "--replay", str(answers), "--live", str(prompts),
                                       "--live", str(chats), "--max-num-seqs", "2", "--max-new-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["replay"]["per_label"]["unsafe_compliance"]["block_rate"] == 1.0  # always pauses, no classifier
    assert all(g["block_rate"] == 1.0 for g in report["live"]["groups"].values())
    assert report["live"]["groups"]["split (harmful)"]["prompts"] == 1
    chats.write_text(json.dumps({"prompt": "w5", "prompt_label": "harmful", "messages": [{"role": "bot"}]}) + "\n")
    bad = CliRunner().invoke(main, ["eval", "--model", str(root / "model"), "--probe", str(root / "probe"),
                                    "--no-classifier", "--live", str(chats)])
    assert bad.exit_code == 1 and f"{chats}:1: messages[0].role must be one of" in bad.output


def test_headroom_command(guarded_setup, tmp_path):
    """headroom on labelled exchanges (probe alone), and a one-line error for a file with one class."""
    root, _ = guarded_setup
    data = tmp_path / "answers.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"w{20 + i} w9", "response": f"w{100 + 100 * (i % 2)} w101 w102",
                                        "label": 2 * (i % 2)}) + "\n" for i in range(24)))
    result = CliRunner().invoke(main, ["headroom", "--data", str(data), "--model", str(root / "model"), "--probe",
                                       str(root / "probe"), "--no-classifier", "--folds", "3",
                                       "--max-response-tokens", "4", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert set(report["cross_validated"]) == {"probe", "probe_first"} and report["checkpoint"] is None
    one_class = tmp_path / "unsafe.jsonl"
    one_class.write_text(json.dumps({"prompt": "p", "response": "r", "label": 2}) + "\n")
    result = CliRunner().invoke(main, ["headroom", "--data", str(one_class), "--model", str(root / "model")])
    assert result.exit_code == 1 and "needs unsafe_compliance and safe_compliance" in result.output
    missing = CliRunner().invoke(main, ["headroom", "--data", str(data), "--model", str(root / "model"), "--probe",
                                        str(root / "probe"), "--classifier-checkpoint", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "cannot read the classifier checkpoint" in missing.output
    assert "Traceback" not in missing.output


def test_a_verdict_later_than_the_deadline_releases_nothing(guarded_setup):
    """Through the CLI with the real ONNX classifier: every verdict takes longer than a
    microsecond, so each counts as a timeout, whatever it says, and the refusal is all that shows."""
    root, classifier = guarded_setup
    result = CliRunner().invoke(main, ["generate", "--model", str(root / "model"), "--prompt", "w5 w6 w7",
                                       "--no-chat-template", "--no-compile", "--dtype", "float32", "--max-new-tokens",
                                       "6", "--probe", str(root / "probe"), "--classifier", str(classifier),
                                       "--deadline", "0.000001", "--refusal", "NOPE", "--json"])
    assert result.exit_code == 0, result.output
    row = json.loads(result.stdout.splitlines()[-1])
    assert (row["status"], row["reason"], row["text"]) == ("blocked", "classifier timeout", "")
    assert row["refusal"] == "NOPE"
    assert row["token_ids"] == []
    assert [v["verdict"] for v in row["verdicts"]] == ["timeout"]
