"""docs/own-model.md at tiny size, on a random Gemma 3 (another architecture than the embedded
Llama; like Gemma 3 270M, a base model with no chat template): every step from the documented
commands and formats, so that the journey stays working.

collect -> train-probe -> calibrate-guard --write -> generate, eval and serve with --config."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from oc_engine.cli import main

SAMPLES = Path(__file__).resolve().parents[1] / "docs" / "samples"


def _run(*args) -> str:
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result.stdout


def test_the_sample_files_are_in_the_documented_formats():
    from oc_engine.training.onpolicy import read_labelled_prompts
    from oc_engine.training.probe_pipeline import read_specs

    prompts = read_labelled_prompts(SAMPLES / "prompts.jsonl")
    assert {r.prompt_label for r in prompts} == {"harmful", "benign"}
    exchanges = read_specs([(str(SAMPLES / "exchanges.jsonl"), None)], None, 0)
    assert {e.label for e in exchanges} == {0, 1, 2}


@pytest.fixture
def gemma3_dir(tmp_path):
    from tiny_models import tiny_model

    loaded = tiny_model("gemma3")
    assert not getattr(loaded.tokenizer, "chat_template", None)  # a base model, as Gemma 3 270M
    loaded.model.save_pretrained(tmp_path / "gemma3")
    loaded.tokenizer.save_pretrained(tmp_path / "gemma3")
    return tmp_path / "gemma3"


def _data(root: Path):
    """Prompts and labelled exchanges in the documented formats, in the tiny tokenizer's words:
    harmful requests and unsafe answers use words the benign ones do not."""
    rng = random.Random(0)
    prompts, exchanges = [], []
    for i in range(40):
        harmful = i % 2 == 0
        words = range(300, 400) if harmful else range(100, 200)
        prompt = " ".join(f"w{rng.choice(words)}" for _ in range(4))
        prompts.append({"prompt": prompt, "prompt_label": "harmful" if harmful else "benign", "source": "mine"})
        response = " ".join(f"w{rng.choice(words)}" for _ in range(10))
        exchanges.append({"prompt": prompt, "response": response, "label": 2 if harmful else 0})
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in prompts))
    (root / "exchanges.jsonl").write_text("".join(json.dumps(r) + "\n" for r in exchanges))


def test_the_journey_on_a_random_gemma3(gemma3_dir, tiny_classifier, tmp_path):
    from openai import OpenAI
    from server_helpers import ServerProcess

    _data(tmp_path)
    model = gemma3_dir
    # 0. without a probe the model is refused, not served unguarded
    refused = CliRunner().invoke(main, ["generate", "--model", str(model), "--prompt", "w5"])
    assert refused.exit_code == 1 and "no probe for" in refused.output
    # 2. the model's own answers
    _run("collect", "--model", model, "--prompts", tmp_path / "prompts.jsonl", "--out", tmp_path / "answers.jsonl",
         "--max-new-tokens", 6, "--max-num-seqs", 8)
    assert len((tmp_path / "answers.jsonl").read_text().splitlines()) == 40
    # 4. the probe, on the answers and the labelled exchanges
    report = json.loads(_run("train-probe", "--model", model, "--data", tmp_path / "answers.jsonl", "--data",
                             tmp_path / "exchanges.jsonl", "--layer", 2, "--layer", 3, "--steps", 60,
                             "--max-response-tokens", 8, "--out", tmp_path / "probe", "--json"))
    assert report["validation_auroc"] > 0.5 and (tmp_path / "probe" / "probe.safetensors").is_file()
    # 5. both stages calibrated together, written into a classifier the user owns
    shutil.copytree(tiny_classifier[1], tmp_path / "classifier")
    probe_config = (tmp_path / "probe" / "probe_config.json").read_text()
    calibrate = ["calibrate-guard", "--model", model, "--probe", tmp_path / "probe", "--classifier",
                 tmp_path / "classifier", "--data", tmp_path / "exchanges.jsonl", "--max-response-tokens", 8]
    import oc_engine.training.guard_calibration as calibration_module

    real = calibration_module.calibrate_guard

    def nothing_fits(*args, **kwargs):  # as when every point breaks a budget
        report = real(*args, **kwargs)
        report["chosen"] = {name: None for name in report["chosen"]}
        return report

    with pytest.MonkeyPatch.context() as patch:  # the curve is reported and kept, and nothing is written
        patch.setattr(calibration_module, "calibrate_guard", nothing_fits)
        strict = CliRunner().invoke(main, [str(a) for a in calibrate] + ["--write", "--out", str(tmp_path / "c.json")])
    assert strict.exit_code == 1 and "no point of the curve fits the budgets: nothing written" in strict.output
    assert json.loads((tmp_path / "c.json").read_text())["written"] is None
    assert (tmp_path / "probe" / "probe_config.json").read_text() == probe_config
    calibration = json.loads(_run(*calibrate, "--write", "--json"))
    assert calibration["written"]
    assert "guard_calibration" in json.loads((tmp_path / "classifier" / "classifier_config.json").read_text())
    # 6. one config file for generate, eval and serve (paths relative to it)
    config = tmp_path / "mine.toml"
    config.write_text("model = 'gemma3'\n[engine]\ndtype = 'float32'\ncompile = false\nmax_model_len = 64\n"
                      "[guard]\nprobe = 'probe'\nclassifier = 'classifier'\n[sampling]\nmax_tokens = 6\n"
                      "[server]\nmax_tokens_limit = 8\n")
    row = json.loads(_run("generate", "--config", config, "--prompt", "w301 w302", "--json").splitlines()[-1])
    assert row["status"] in ("completed", "blocked") and row["generated_tokens"] <= 6
    live = json.loads(_run("eval", "--config", config, "--live", tmp_path / "prompts.jsonl", "--max-new-tokens", 4,
                           "--json"))
    assert sum(g["prompts"] for g in live["live"]["groups"].values()) == 40
    server = ServerProcess(["--config", str(config)], tmp_path / "serve.log").wait_ready()
    try:
        client = OpenAI(base_url=server.base + "/v1", api_key="unused")
        done = client.completions.create(model=str(tmp_path / "gemma3"), prompt="w301 w302", max_tokens=4)
        assert done.choices[0].finish_reason in ("length", "stop", "content_filter")
        with pytest.raises(Exception, match="max_tokens"):  # the file's [server] limit holds
            client.completions.create(model=str(tmp_path / "gemma3"), prompt="w301", max_tokens=9)
    finally:
        server.terminate()
