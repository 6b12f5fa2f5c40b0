"""The quantized decode and quality benchmarks at tiny sizes: they run end to end and report
what they claim (llama.cpp's binary is not a dependency; its GGUF reading and library links are
tested apart)."""

import json

import pytest

from oc_engine.errors import OcEngineError


def test_decode_bench_times_each_quantization_with_and_without_the_probe(tiny_model_dir):
    from oc_engine.bench.quantized import quantized_markdown, run_quantized_decode_bench

    model = str(tiny_model_dir(0.0) / "model")
    report = run_quantized_decode_bench(model, dtype="float32", device="cpu", quantizations=["none", "int8"],
                                        new_tokens=4, repeats=1)
    names = [r["name"] for r in report["results"]]
    assert names == ["engine unquantized", "engine unquantized + probe", "engine int8", "engine int8 + probe"]
    plain, int8 = report["results"][0], report["results"][2]
    assert int8["weight_mb"] < plain["weight_mb"] / 1.5 and all(r["tokens_per_s"] > 0 for r in report["results"])
    assert plain["x_unquantized"] == 1.0 and plain["same_tokens_as_unquantized"] is True
    assert set(report["probe_cost"]) == {"none", "int8"} and report["order"] == "round-robin"
    assert "| engine int8 + probe |" in quantized_markdown(report)
    with pytest.raises(OcEngineError, match="GGUF the model comes from"):
        run_quantized_decode_bench(model, dtype="float32", device="cpu", quantizations=["none"], llama_cpp="auto")


def test_quality_bench_compares_answers_and_perplexity(tiny_model_dir, tmp_path):
    from oc_engine.bench.quality import quality_markdown, run_quality_bench

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"w{5 + i % 50}" for i in range(200)))
    report = run_quality_bench(str(tiny_model_dir(0.0) / "model"), dtype="float32", device="cpu",
                               quantizations=["int8"], prompts=["w5 w6 w7", "w8 w9"], max_tokens=6,
                               text=str(text), context=32, batch_size=2)
    rows = {r["quantization"]: r for r in report["results"]}
    assert rows["none"]["identical_answers"] == 1.0 and rows["none"]["mean_prefix_agreement"] == 1.0
    assert 0 <= rows["int8"]["identical_answers"] <= 1 and 1 < rows["int8"]["perplexity"] < 10_000
    assert "| int8 |" in quality_markdown(report)
    with pytest.raises(OcEngineError, match="cannot read the perplexity text"):
        run_quality_bench(None, dtype="float32", device="cpu", quantizations=[], prompts=["x"],
                          text=str(tmp_path / "missing.txt"))


def test_llama_cpp_helpers_read_the_gguf_and_link_versioned_libraries(tmp_path):
    from oc_engine.bench.llama_cpp import _link_versioned_libraries, find_llama_server, gguf_weight_bytes
    from oc_engine.models.embedded import embedded_gguf_path

    size = gguf_weight_bytes(embedded_gguf_path())
    assert 80e6 < size < embedded_gguf_path().stat().st_size  # every tensor, without the metadata
    libs = tmp_path / "bin"
    libs.mkdir()
    (libs / "libggml.so.0.26.0").write_bytes(b"")
    (libs / "_symlinks.json").write_text(json.dumps({"libggml.so.0": "libggml.so.0.26.0",
                                                     "libggml.so": "libggml.so.0"}))
    into = tmp_path / "links"
    into.mkdir()
    _link_versioned_libraries(libs, into)
    assert (into / "libggml.so").resolve() == (libs / "libggml.so.0.26.0").resolve()
    with pytest.raises(OcEngineError, match="no llama-server binary at"):
        find_llama_server(str(tmp_path / "nope"))


def test_bench_decode_cli_refuses_modes_with_quantize():
    from click.testing import CliRunner

    from oc_engine.cli import main

    result = CliRunner().invoke(main, ["bench", "decode", "--quantize", "int8", "--mode", "hf_generate"])
    assert result.exit_code != 0 and "--mode and --quantize do not mix" in result.output
