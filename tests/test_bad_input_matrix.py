"""Bad input, as a matrix: every command's options and every file format the project reads.

Each CLI case asserts the exit status, a one-line message that names the problem (no
traceback), and that nothing was written or left behind in the working directory. The file
formats (probe and classifier configs, prompt files, labelled exchanges, traces) are also
driven with any JSON value in each field (hypothesis): a clean error or a valid load, never
another exception.
"""

import json
import shutil
import socket
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from oc_engine.cli import main
from oc_engine.errors import OcEngineError

NOT_UTF8 = b'{"prompt": "caf\xe9", "prompt_label": "benign", "response": "x", "label": 0}\n'


@pytest.fixture(scope="module")
def inputs(tiny_model_dir, tiny_classifier, tmp_path_factory):
    """Good inputs to spoil: a tiny model, a probe for it, a classifier export, data files."""
    root = tmp_path_factory.mktemp("inputs")
    shutil.copytree(tiny_model_dir(0.0), root, dirs_exist_ok=True)
    shutil.copytree(tiny_classifier[1], root / "classifier")
    shutil.copytree(tiny_classifier[0], root / "hf-classifier")
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": f"w{5 + i} w6", "prompt_label": label}) + "\n"
                                                for i, label in enumerate(["harmful", "benign"])))
    (root / "exchanges.jsonl").write_text("".join(
        json.dumps({"prompt": f"w{20 + i} w9", "response": f"w{100 + i} w101", "label": 2 * (i % 2)}) + "\n"
        for i in range(12)))
    _reader(root / "model", (2,), root / "reader")  # the probe taps hidden state 2 (-2 of 3 layers)
    _reader(root / "model", (1,), root / "reader-layer1")
    (root / "trace.jsonl").write_text(json.dumps({"sequence": 0, "index": 0, "token": 5, "score": 0.1, "ema": 0.1,
                                                  "flags": 0, "warn": 0.5, "pause": 0.8, "events": []}) + "\n")
    return root


def _reader(model_dir, layers, out):
    """A state reader with random weights for the tiny model saved in `model_dir`."""
    import numpy as np
    from transformers import AutoModelForCausalLM

    from oc_engine.guard.probe import ModelFingerprint
    from oc_engine.guard.state_reader import ReaderConfig, save_reader

    fingerprint = ModelFingerprint.of(AutoModelForCausalLM.from_pretrained(model_dir))
    config = ReaderConfig(model=fingerprint, layers=layers, hidden_size=fingerprint.hidden_size,
                          labels=("safe_compliance", "safe_refusal", "unsafe_compliance"), unsafe_label=2,
                          allow_threshold=0.9, block_threshold=0.9)
    size = config.feature_size
    save_reader(config, {"mean": np.zeros(size, np.float32), "scale": np.ones(size, np.float32),
                         "w1": np.full((4, size), 0.01, np.float32), "b1": np.zeros(4, np.float32),
                         "w2": np.ones((3, 4), np.float32), "b2": np.zeros(3, np.float32)}, out)


CONFIG_FILES = {"probe": "probe_config.json", "classifier": "classifier_config.json", "reader": "reader_config.json"}


def _spoil(inputs, tmp_path, name, edit):
    """A copy of the probe, classifier or state reader directory with its config edited."""
    target = tmp_path / f"bad-{name}"
    shutil.rmtree(target, ignore_errors=True)  # hypothesis reuses tmp_path across examples
    shutil.copytree(inputs / name, target)
    file = target / CONFIG_FILES[name]
    config = json.loads(file.read_text())
    edit(config)
    file.write_text(json.dumps(config))
    return target


def _file(tmp_path, name, content):
    """The file written; for a name under a folder ("delta/x.json"), that folder."""
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return tmp_path / name.split("/")[0]


# Each case: (command line with {placeholders}, exit status, what the message must say).
# {in}: the good inputs; {tmp}: this case's own empty directory; {file}: a regular file there (a
# path under it cannot be written); {bad_*}: files and directories the case spoils first.
GENERATE = "generate --model {in}/model --no-compile --no-chat-template --max-new-tokens 3 --probe {in}/probe"
CASES = {
    # generate: options
    "seed negative": (GENERATE + " --prompt w5 --seed -1", 2, "'--seed': -1 is not in the range"),
    "seed beyond 32 bits": (GENERATE + " --prompt w5 --seed 4294967296", 2, "is not in the range"),
    "deadline overflow": (GENERATE + " --prompt w5 --deadline 1e300", 2, "'--deadline'"),
    "deadline nan": (GENERATE + " --prompt w5 --deadline nan", 2, "nan is not a finite number"),
    "temperature inf": (GENERATE + " --prompt w5 --temperature inf", 2, "inf is not a finite number"),
    "top-p nan": (GENERATE + " --prompt w5 --top-p nan", 2, "nan is not a finite number"),
    "pause above 1": (GENERATE + " --prompt w5 --pause 1.5", 2, "'--pause'"),
    "empty stop string": (GENERATE + " --prompt w5 --stop ''", 1, "a stop string must be non-empty"),
    "empty prompt": (GENERATE + " --prompt ''", 1, "prompt 1 is empty"),
    "tap-layer is gone": (GENERATE + " --prompt w5 --tap-layer -4", 2, "No such option '--tap-layer'"),
    "catch-up is gone": (GENERATE + " --prompt w5 --catch-up wait", 2, "No such option '--catch-up'"),
    "trace under a file": (GENERATE + " --prompt w5 --trace {file}/t.jsonl", 1,
                           "--trace {file}/t.jsonl: cannot write in"),
    "trace is a directory": (GENERATE + " --prompt w5 --trace {tmp}", 2, "is a directory"),
    "trace-held without trace": (GENERATE + " --prompt w5 --trace-held", 1, "--trace-held needs --trace"),
    "unknown device": (GENERATE + " --prompt w5 --device tpu", 1, "unknown device 'tpu'"),
    "batch bucket zero": (GENERATE + " --prompt w5 --batch-buckets 1,0", 2, "every size must be at least 1"),
    "batch buckets not numbers": (GENERATE + " --prompt w5 --batch-buckets one", 2,
                                  "'one' is not a comma-separated list of integers"),
    "no guard with a probe": ("generate --prompt w5 --no-guard --probe {in}/probe", 1, "--no-guard excludes"),
    "offline hub id": ("generate --model org/not-cached-anywhere --prompt x --no-guard", 1,
                       "the hub cannot be reached and the model is not in the local Hugging Face cache"),
    "model dir without config": ("generate --model {tmp} --prompt x --no-guard", 1, "no config.json"),
    # generate: prompt files
    "prompts not UTF-8 (jsonl)": (GENERATE + " --prompts-file {bad_prompts_jsonl}", 1, "is not UTF-8 text"),
    "prompts not UTF-8 (text)": (GENERATE + " --prompts-file {bad_prompts_txt}", 1, "is not UTF-8 text"),
    "prompt is a number": (GENERATE + " --prompts-file {number_prompt}", 1, ":1: 'prompt' must be a non-empty string"),
    "prompts missing field": (GENERATE + " --prompts-file {no_prompt_field}", 1, ":1: missing field 'prompt'"),
    # generate: probe directories
    "probe layers a string": (GENERATE + " --prompt w5 --probe {bad_probe_layers}", 1,
                              "'layers' must be a list of integers, got '-2'"),
    "probe every a fraction": (GENERATE + " --prompt w5 --probe {bad_probe_every}", 1,
                               "'every' must be an integer, got 1.5"),
    "probe chat_template a string": (GENERATE + " --prompt w5 --probe {bad_probe_chat}", 1,
                                     "'chat_template' must be true or false, got 'false'"),
    "probe alpha nan": (GENERATE + " --prompt w5 --probe {bad_probe_alpha}", 1, "'alpha' must be a finite number"),
    "probe without a fingerprint": (GENERATE + " --prompt w5 --probe {bad_probe_model}", 1, "missing field 'model'"),
    "probe dir missing": (GENERATE + " --prompt w5 --probe {tmp}/nothing", 1, "probe directory not found"),
    # generate: classifier directories
    "classifier labels a string": (GENERATE + " --prompt w5 --classifier {bad_classifier_labels}", 1,
                                   "'labels' must be a list of strings"),
    "classifier format a glued template": (GENERATE + " --prompt w5 --classifier {bad_classifier_format}", 1,
                                           "input_format must be 'text-pair'"),
    "classifier of the retired format": (GENERATE + " --prompt w5 --classifier {old_classifier_format}", 1,
                                         "retrain it with `oc-engine train-classifier`"),
    "classifier max_length a fraction": (GENERATE + " --prompt w5 --classifier {bad_classifier_length}", 1,
                                         "'max_length' must be an integer, got 128.5"),
    "classifier unsafe label out of range": (GENERATE + " --prompt w5 --classifier {bad_classifier_unsafe}", 1,
                                             "unsafe_label 7 is not one of the 3 labels"),
    "classifier dir without config": (GENERATE + " --prompt w5 --classifier {tmp}", 1, "is not a classifier export"),
    # generate: state reader directories
    "reader for another layer set": (GENERATE + " --prompt w5 --classifier {in}/reader-layer1", 1,
                                     "the state reader reads layers [1] and the probe taps [2]"),
    "reader for another model": ("generate --prompt w5 --no-compile --max-new-tokens 3 --classifier {in}/reader", 1,
                                 "the state reader was trained for another model"),
    "reader with the input check": (GENERATE + " --prompt w5 --classifier {in}/reader --input-check", 1,
                                    "the input check judges the prompt as text"),
    "reader threshold a string": (GENERATE + " --prompt w5 --classifier {bad_reader_threshold}", 1,
                                  "'block_threshold' must be"),
    "reader weights missing": (GENERATE + " --prompt w5 --classifier {bad_reader_weights}", 1,
                               "state reader file is missing"),
    # train-reader
    "train-reader without data": ("train-reader --model {in}/model --probe {in}/probe --out {tmp}/r", 1,
                                  "give --data FILE"),
    "train-reader default with a model": ("train-reader --default --model {in}/model", 1,
                                          "--default builds the shipped reader for the embedded model"),
    "train-reader out under a file": ("train-reader --model {in}/model --probe {in}/probe --data "
                                      "{in}/exchanges.jsonl --out {file}/r", 1, "cannot write in"),
    "train-reader without a probe": ("train-reader --model {in}/model --data {in}/exchanges.jsonl --out {tmp}/r", 1,
                                     "give --probe DIR"),
    # plot-trace
    "plot unknown file type": ("plot-trace {in}/trace.jsonl --out {tmp}/risk.xyz", 1, "unknown file type '.xyz'"),
    "plot under a file": ("plot-trace {in}/trace.jsonl --out {file}/risk.png", 1, "cannot write in"),
    "trace not UTF-8": ("plot-trace {bad_trace_bytes} --out {tmp}/risk.png", 1, ":1: not UTF-8 text"),
    "trace score a string": ("plot-trace {bad_trace_score} --out {tmp}/risk.png", 1, "'score' must be a number"),
    "trace events not a list": ("plot-trace {bad_trace_events} --out {tmp}/risk.png", 1, "'events' must be a list"),
    # collect
    "collect prompts not UTF-8": ("collect --prompts {bad_prompts_jsonl} --out {tmp}/out.jsonl --model {in}/model", 1,
                                  ":1: not UTF-8 text"),
    "collect filter keeps nothing": ("collect --prompts {in}/prompts.jsonl@nowhere --out {tmp}/out.jsonl "
                                     "--model {in}/model", 1, "has no prompts with a source containing 'nowhere'"),
    "collect out under a file": ("collect --prompts {in}/prompts.jsonl --out {file}/out.jsonl --model {in}/model", 1,
                                 "cannot write in"),
    "collect seed negative": ("collect --prompts {in}/prompts.jsonl --out {tmp}/o.jsonl --seed -5", 2, "'--seed'"),
    # eval
    "eval replay not UTF-8": ("eval --model {in}/model --probe {in}/probe --no-classifier "
                              "--replay {bad_exchanges_bytes}", 1, ":1: not UTF-8 text"),
    "eval label true": ("eval --model {in}/model --probe {in}/probe --no-classifier --replay {label_true}", 1,
                        ":1: label must be 0, 1, 2 or null, got True"),
    "eval label fraction": ("eval --model {in}/model --probe {in}/probe --no-classifier --replay {label_fraction}", 1,
                            ":1: label must be 0, 1, 2 or null, got 2.5"),
    "eval response a list": ("eval --model {in}/model --probe {in}/probe --no-classifier --replay {response_list}", 1,
                             ":1: 'response' must be a string, got list"),
    "eval plot unknown type": ("eval --model {in}/model --probe {in}/probe --no-classifier --replay "
                               "{in}/exchanges.jsonl --plot {tmp}/p.xyz", 1, "unknown file type '.xyz'"),
    "eval out under a file": ("eval --model {in}/model --probe {in}/probe --no-classifier --replay "
                              "{in}/exchanges.jsonl --out {file}/r.json", 1, "cannot write in"),
    # probes
    "train-probe out is a file": ("train-probe --model {in}/model --data {in}/exchanges.jsonl --out {file}", 2,
                                  "is a file"),
    "train-probe out under a file": ("train-probe --model {in}/model --data {in}/exchanges.jsonl --out {file}/p", 1,
                                     "cannot write in"),
    "train-probe data not UTF-8": ("train-probe --model {in}/model --data {bad_exchanges_bytes} --out {tmp}/probe",
                                   1, ":1: not UTF-8 text"),
    "sweep plot unknown type": ("sweep-layers --model {in}/model --data {in}/exchanges.jsonl --plot {tmp}/s.bmpx", 1,
                                "unknown file type '.bmpx'"),
    "headroom more folds than prompts": ("headroom --model {in}/model --probe {in}/probe --no-classifier --data "
                                         "{in}/exchanges.jsonl --folds 1000", 1,
                                         "1000 folds need at least 1000 distinct prompts; the data has 12"),
    "headroom out under a file": ("headroom --model {in}/model --probe {in}/probe --no-classifier --data "
                                  "{in}/exchanges.jsonl --out {file}/h.json", 1, "cannot write in"),
    # classifiers
    "train-classifier lr nan": ("train-classifier --data {in}/exchanges.jsonl --out {tmp}/c --lr nan", 2,
                                "nan is not a finite number"),
    "train-classifier epochs zero": ("train-classifier --data {in}/exchanges.jsonl --out {tmp}/c --epochs 0", 2,
                                     "'--epochs'"),
    "train-classifier epochs beyond 100": ("train-classifier --data {in}/exchanges.jsonl --out {tmp}/c --epochs 1e300",
                                           2, "'--epochs'"),
    "train-probe steps beyond 100000": ("train-probe --data {in}/exchanges.jsonl --out {tmp}/p --steps 1000000000", 2,
                                        "'--steps'"),
    "export max length beyond positions": ("export-classifier {in}/hf-classifier --out {tmp}/onnx "
                                           "--max-length 100000", 1,
                                           "max length 100000 is longer than the model's 512 positions"),
    "train-classifier out under a file": ("train-classifier --data {in}/exchanges.jsonl --out {file}/c", 1,
                                          "cannot write in"),
    "calibrate a bad config": ("calibrate-classifier {bad_classifier_labels} --data {in}/exchanges.jsonl", 1,
                               "'labels' must be a list of strings"),
    "export out under a file": ("export-classifier {in}/classifier --out {file}/onnx", 1, "cannot write in"),
    "export tolerance nan": ("export-classifier {in}/classifier --out {tmp}/onnx --tolerance nan", 2,
                             "nan is not a finite number"),
    # bench
    "bench out under a file": ("bench decode --model {in}/model --out {file}/b.json", 1, "cannot write in"),
    "bench beyond the context": ("bench decode --model {in}/model --max-new-tokens 100000 --mode engine_eager "
                                 "--repeats 1", 1, "exceed the model's context of 256 tokens"),
    "bench classifier not an export": ("bench classifier --classifier {in}/probe", 1,
                                       "is not a classifier export"),
    # the guard as shipped
    "input check without a probe": ("generate --model {in}/model --no-guard --prompt w5 --input-check", 1,
                                    "--input-check and --trace need the guard: drop --no-guard"),
    "a model with no probe is never silently unguarded": ("generate --model {in}/model --prompt w5", 1,
                                                          "no probe for {in}/model: a probe ships only for the "
                                                          "embedded model. Give --probe DIR"),
    "a classifier with no probe": ("generate --model {in}/model --prompt w5 --classifier {in}/probe", 1,
                                   "no probe for {in}/model"),
    "classifier delta missing a file": (GENERATE + " --prompt w5 --classifier {bad_delta}", 1,
                                        "classifier delta file is missing"),
    "default build with an export": ("train-classifier --default --export {tmp}/x", 1,
                                     "--default ships a delta and exports it itself"),
    "calibrate-guard budget above 1": ("calibrate-guard --model {in}/model --probe {in}/probe "
                                       "--benign-block-budget 1.5", 2, "'--benign-block-budget'"),
    "calibrate-guard plot unknown type": ("calibrate-guard --model {in}/model --probe {in}/probe --plot {tmp}/c.xyz",
                                          1, "unknown file type '.xyz'"),
    "calibrate-guard would write into the shipped classifier": ("calibrate-guard --model {in}/model --probe "
                                                                "{in}/probe --write", 1,
                                                                "--write would change the shipped classifier"),
    "calibrate-guard writes only from held-out data": ("calibrate-guard --model {in}/model --probe {in}/probe "
                                                        "--data {in}/exchanges.jsonl --no-split --write", 1,
                                                        "drop --no-split"),
    "bench input-check out under a file": ("bench input-check --model {in}/model --out {file}/b.json", 1,
                                           "cannot write in"),
    # serve: refused before the server starts, or when its model cannot load
    "serve port 0": ("serve --port 0", 2, "'--port'"),
    "serve negative max-waiting": ("serve --max-waiting -1", 2, "'--max-waiting'"),
    "serve audit log under a file": ("serve --model {in}/model --audit-log {file}/a.jsonl", 1,
                                     "--audit-log {file}/a.jsonl: cannot write in"),
    "serve no guard with a probe": ("serve --model {in}/model --no-guard --probe {in}/probe", 1,
                                    "--no-guard excludes"),
    "serve a model that does not load": ("serve --model {tmp} --no-guard --port {port}", 1,
                                         "the model could not be loaded: "),
    "serve a port in use": ("serve --model {in}/model --no-guard --no-compile --port {busy_port}", 1,
                            "cannot listen on 127.0.0.1:{busy_port}"),
    "serve a model with no probe": ("serve --model {in}/model --port {port}", 1, "or --no-guard for plain"),
    "serve vllm backend not installed": ("serve --model {in}/model --no-guard --backend vllm --port {port}", 1,
                                         "uv run --project integrations/vllm"),
    "serve unknown backend": ("serve --backend tgi", 2, "'--backend'"),
    "bench serve vllm servers not installed": ("bench serve --server vllm-guarded", 1,
                                               "uv run --project integrations/vllm"),
    "bench serve unequal lists": ("bench serve --concurrency 1,4 --requests 8", 1, "one count per --concurrency"),
    # quantization
    "unknown quantization": (GENERATE + " --prompt w5 --quantize int3", 2, "'--quantize'"),
    "int4 on layers its packing cannot cut": ("generate --model {in}/model --no-guard --prompt w5 --quantize int4", 1,
                                              "int4 needs layers whose inputs are a multiple of 32"),
    "unquantized probe on a quantized model": (GENERATE + " --prompt w5 --quantize int8", 1,
                                               "it was never re-validated there"),
    "revalidate without --out or --in-place": ("revalidate-probe --model {in}/model --probe {in}/probe --quantize int8 "
                                               "--data {in}/exchanges.jsonl", 1, "give --out DIR"),
    "revalidate out under a file": ("revalidate-probe --model {in}/model --probe {in}/probe --quantize int8 "
                                    "--data {in}/exchanges.jsonl --out {file}/p", 1, "cannot write in"),
    "revalidate tolerance above 1": ("revalidate-probe --probe {in}/probe --quantize int8 --tolerance 2 --in-place", 2,
                                     "'--tolerance'"),
    "bench quality text missing": ("bench quality --model {in}/model --prompts {in}/prompts.jsonl --text {tmp}/no.txt",
                                   1, "cannot read the perplexity text"),
    "bench decode llama.cpp binary missing": ("bench decode --quantize int8 --llama-cpp {tmp}/llama-server", 1,
                                              "no llama-server binary at"),
    # --config: checked whole, before anything loads; one line naming the file, section and key
    "config missing": ("generate --config {tmp}/none.toml --prompt w5", 1, "--config {tmp}/none.toml: no such file"),
    "config not TOML": ("serve --config {config_not_toml}", 1, "not valid TOML"),
    "config unknown section": ("eval --config {config_unknown_section}", 1, "unknown section or key 'engin'"),
    "config misspelt key": ("generate --config {config_misspelt} --prompt w5", 1,
                            "[engine] has no setting 'max_num_seq' (did you mean max_num_seqs?)"),
    "config bad dtype": ("generate --config {config_bad_dtype} --prompt w5", 1, "[engine] dtype must be one of"),
    "config bool as text": ("serve --config {config_bool_text}", 1, "[guard] enabled must be true or false, got 'no'"),
    "config deadline negative": ("generate --config {config_bad_deadline} --prompt w5", 1,
                                 "[policy] classifier deadline must be in (0, 3600] s"),
    "config pause above 1": ("generate --config {config_bad_pause} --prompt w5", 1,
                             "[guard] pause must be a number in [0, 1], got 1.5"),
    "config temperature negative": ("generate --config {config_bad_temperature} --prompt w5", 1,
                                    "[sampling] temperature must be a finite number >= 0"),
    "config batch buckets a number": ("generate --config {config_bad_buckets} --prompt w5", 1,
                                      "[engine] batch_buckets must be a list of integers, got 4"),
    "config server port": ("serve --config {config_bad_port}", 1, "[server] port must be an integer in [1, 65535]"),
    "config server limit": ("serve --config {config_bad_limit}", 1, "[server] max_tokens_limit must be an integer"),
    "config model not text": ("generate --config {config_model_number} --prompt w5", 1, "model must be text"),
    "config no probe for its model": ("generate --config {config_other_model} --prompt w5", 1,
                                      "no probe for"),
}

SPOILED_FILES = {
    "bad_prompts_jsonl": ("p.jsonl", NOT_UTF8),
    "bad_prompts_txt": ("p.txt", b"caf\xe9\n"),
    "number_prompt": ("n.jsonl", '{"prompt": 5}\n'),
    "no_prompt_field": ("f.jsonl", '{"text": "w5"}\n'),
    "bad_trace_bytes": ("t.jsonl", b"\xff\xfe\n"),
    "bad_trace_score": ("t.jsonl", json.dumps({"sequence": 0, "index": 0, "score": "high", "ema": 0.1, "warn": 0.5,
                                               "pause": 0.8}) + "\n"),
    "bad_trace_events": ("t.jsonl", json.dumps({"sequence": 0, "index": 0, "score": 0.1, "ema": 0.1, "warn": 0.5,
                                                "pause": 0.8, "events": "pause"}) + "\n"),
    "bad_exchanges_bytes": ("e.jsonl", NOT_UTF8),
    "label_true": ("e.jsonl", '{"prompt": "p", "response": "r", "label": true}\n'),
    "label_fraction": ("e.jsonl", '{"prompt": "p", "response": "r", "label": 2.5}\n'),
    "response_list": ("e.jsonl", '{"prompt": "p", "response": ["r"], "label": 2}\n'),
    "bad_delta": ("delta/classifier_delta.json", '{"format": "oc-engine-classifier-delta/0"}\n'),
    "config_not_toml": ("c.toml", "[engine\n"),
    "config_unknown_section": ("c.toml", "[engin]\ndtype = 'float32'\n"),
    "config_misspelt": ("c.toml", "[engine]\nmax_num_seq = 4\n"),
    "config_bad_dtype": ("c.toml", "[engine]\ndtype = 'int3'\n"),
    "config_bool_text": ("c.toml", "[guard]\nenabled = 'no'\n"),
    "config_bad_deadline": ("c.toml", "[policy]\ndeadline_s = -1\n"),
    "config_bad_pause": ("c.toml", "[guard]\npause = 1.5\n"),
    "config_bad_temperature": ("c.toml", "[sampling]\ntemperature = -0.5\n"),
    "config_bad_port": ("c.toml", "[server]\nport = 0\n"),
    "config_bad_buckets": ("c.toml", "[engine]\nbatch_buckets = 4\n"),
    "config_bad_limit": ("c.toml", "[server]\nmax_tokens_limit = 0\n"),
    "config_model_number": ("c.toml", "model = 5\n"),
}
SPOILED_DIRS = {
    "bad_probe_layers": ("probe", lambda c: c.update(layers="-2")),
    "bad_probe_every": ("probe", lambda c: c.update(every=1.5)),
    "bad_probe_chat": ("probe", lambda c: c.update(chat_template="false")),
    "bad_probe_alpha": ("probe", lambda c: c.update(alpha="nan")),
    "bad_probe_model": ("probe", lambda c: c.pop("model")),
    "bad_classifier_labels": ("classifier", lambda c: c.update(labels="safe,unsafe")),
    "bad_classifier_format": ("classifier", lambda c: c.update(input_format="User: {prompt}")),
    "old_classifier_format": ("classifier", lambda c: c.update(format="oc-engine-classifier/1")),
    "bad_classifier_length": ("classifier", lambda c: c.update(max_length=128.5)),
    "bad_classifier_unsafe": ("classifier", lambda c: c.update(unsafe_label=7)),
    "bad_reader_threshold": ("reader", lambda c: c.update(block_threshold="high")),
}


def _snapshot(root: Path) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_is_one_line_and_writes_nothing(inputs, tmp_path, monkeypatch, name):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # a closed port: the hub is unreachable
    command, status, message = CASES[name]
    work = tmp_path / "work"
    work.mkdir()
    (work / "afile").write_text("a regular file")
    from server_helpers import free_port

    busy = socket.socket()  # a port some other program holds
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    values = {"in": str(inputs), "tmp": str(work / "case"), "file": str(work / "afile"), "port": str(free_port()),
              "busy_port": str(busy.getsockname()[1])}
    (work / "case").mkdir()
    for key in SPOILED_FILES:
        if "{" + key + "}" in command:
            values[key] = str(_file(tmp_path, *SPOILED_FILES[key]))
    for key, (kind, edit) in SPOILED_DIRS.items():
        if "{" + key + "}" in command:
            values[key] = str(_spoil(inputs, tmp_path, kind, edit))
    if "{config_other_model}" in command:  # a model that has no shipped probe, named by the file
        values["config_other_model"] = str(_file(tmp_path, "other.toml", f"model = '{inputs / 'model'}'\n"))
    if "{bad_reader_weights}" in command:
        values["bad_reader_weights"] = str(_spoil(inputs, tmp_path, "reader", lambda c: None))
        (tmp_path / "bad-reader" / "reader.safetensors").unlink()
    import shlex

    args = [part.format(**values) for part in shlex.split(command)]
    before, inputs_before = _snapshot(work), _snapshot(inputs)
    result = CliRunner().invoke(main, args)
    busy.close()
    assert result.exit_code == status, result.output
    assert isinstance(result.exception, SystemExit), f"uncaught {result.exception!r}"
    output = result.output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, output
    assert message.format(**values) in errors[0], output
    assert _snapshot(work) == before, "a failed command wrote or left something behind"
    assert _snapshot(inputs) == inputs_before


# -- any JSON value in any field ---------------------------------------------------------------
def _loaded_or_one_line_error(load, path):
    """load(path), or None after checking that it failed with a one-line OcEngineError (any
    other exception fails the test)."""
    try:
        return load(path)
    except OcEngineError as exc:
        assert "\n" not in str(exc)
        return None


json_values = st.recursive(st.none() | st.booleans() | st.integers(-2 ** 40, 2 ** 40)
                           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                                       max_size=3),
                           max_leaves=6)
PROBE_FIELDS = ["model", "layers", "hidden_size", "alpha", "warn", "pause", "every", "chat_template", "metrics"]
CLASSIFIER_FIELDS = ["labels", "unsafe_label", "allow_threshold", "block_threshold", "max_length", "input_format",
                     "source_model"]
SLOW_OK = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _set_or_drop(field: str, value, drop: bool):
    """An edit of a config's JSON: `field` (dotted for a nested key) dropped, or set to `value`."""
    def edit(config):
        parent, _, key = field.rpartition(".")
        target = config[parent] if parent else config
        target.pop(key) if drop else target.__setitem__(key, value)
    return edit


@SLOW_OK
@given(field=st.sampled_from(PROBE_FIELDS + ["model.hidden_size", "model.weights_hash", "model.architecture"]),
       value=json_values, drop=st.booleans())
def test_any_value_in_a_probe_config_field_loads_or_fails_cleanly(inputs, tmp_path, field, value, drop):
    from oc_engine.guard.probe import load_probe

    spoiled = _spoil(inputs, tmp_path, "probe", _set_or_drop(field, value, drop))
    probe = _loaded_or_one_line_error(load_probe, spoiled)
    if probe is None:
        return
    c = probe.config
    assert all(type(x) is int for x in c.layers) and type(c.every) is int and type(c.hidden_size) is int
    assert all(type(x) is float for x in (c.alpha, c.warn, c.pause)) and type(c.chat_template) is bool
    assert isinstance(c.metrics, dict) and type(c.model.hidden_size) is int and isinstance(c.model.weights_hash, str)


@SLOW_OK
@given(field=st.sampled_from(CLASSIFIER_FIELDS), value=json_values, drop=st.booleans())
def test_any_value_in_a_classifier_config_field_loads_or_fails_cleanly(inputs, tmp_path, field, value, drop):
    from oc_engine.guard.classifier import load_classifier_config
    from oc_engine.guard.exchange_layout import INPUT_FORMAT

    spoiled = _spoil(inputs, tmp_path, "classifier", _set_or_drop(field, value, drop))
    loaded = _loaded_or_one_line_error(load_classifier_config, spoiled)
    if loaded is None:
        return
    assert all(type(x) is str for x in loaded.labels) and len(set(loaded.labels)) == len(loaded.labels) >= 2
    assert type(loaded.unsafe_label) is int and type(loaded.max_length) is int
    assert 0 <= loaded.allow_threshold <= loaded.block_threshold <= 1
    assert loaded.input_format == INPUT_FORMAT
    assert loaded.source_model is None or isinstance(loaded.source_model, str)


READER_FIELDS = ["model", "layers", "hidden_size", "labels", "unsafe_label", "allow_threshold", "block_threshold",
                 "recent", "metrics"]


@SLOW_OK
@given(field=st.sampled_from(READER_FIELDS + ["model.weights_hash", "model.quantization"]), value=json_values,
       drop=st.booleans())
def test_any_value_in_a_reader_config_field_loads_or_fails_cleanly(inputs, tmp_path, field, value, drop):
    from oc_engine.guard.state_reader import load_reader

    spoiled = _spoil(inputs, tmp_path, "reader", _set_or_drop(field, value, drop))
    reader = _loaded_or_one_line_error(load_reader, spoiled)
    if reader is None:
        return
    c = reader.config
    assert all(type(x) is int for x in c.layers) and type(c.hidden_size) is int and type(c.recent) is int
    assert 0 <= c.allow_threshold <= c.block_threshold <= 1 and type(c.unsafe_label) is int
    assert isinstance(c.metrics, dict) and isinstance(c.model.weights_hash, str)


@SLOW_OK
@given(row=st.fixed_dictionaries({}, optional={"prompt": json_values, "response": json_values,
                                               "label": json_values, "prompt_label": json_values,
                                               "source": json_values}))
def test_any_row_in_a_data_file_reads_or_fails_cleanly(tmp_path, row):
    from oc_engine.data import read_exchanges
    from oc_engine.engine.prompts import read_prompts_file
    from oc_engine.plots import read_trace
    from oc_engine.training.onpolicy import read_labelled_prompts

    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(row) + "\n")
    for read in (read_exchanges, read_prompts_file, read_labelled_prompts, read_trace):
        result = _loaded_or_one_line_error(read, path)
        if result is None:
            continue
        if read is read_exchanges:
            for e in result[0]:
                assert type(e.prompt) is str and type(e.response) is str and type(e.label) is int
        elif read is read_prompts_file:
            assert all(type(p) is str and p.strip() for p in result)
        elif read is read_labelled_prompts:
            assert all(type(r.prompt) is str for r in result)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(row=st.fixed_dictionaries({}, optional={k: json_values for k in
                                               ("sequence", "index", "score", "ema", "warn", "pause", "events")}))
def test_any_trace_row_plots_or_fails_cleanly(tmp_path, row):
    from oc_engine.plots import plot_trace

    path = tmp_path / "trace.jsonl"
    path.write_text(json.dumps(row) + "\n")
    sequence = row["sequence"] if type(row.get("sequence")) is int else 0
    _loaded_or_one_line_error(lambda trace: plot_trace(trace, tmp_path / "risk.png", sequence=sequence), path)
