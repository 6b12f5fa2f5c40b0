"""Weight-only int8/int4: the packed kernels against a dequantized reference, the engine against
Hugging Face's generate on the same quantized model, one compiled graph, and the probe's check."""

import dataclasses

import pytest
import torch

from conftest import hf_greedy
from oc_engine.config import UNGUARDED, EngineConfig, GuardSetup
from oc_engine.errors import OcEngineError
from oc_engine.models.quantize import (INT4_GROUP, QUANTIZER_VERSION, QuantizedLinear, int4_codes,
                                       linear_weight_bytes, quantize_int8, quantize_model)
from probe_helpers import make_probe
from tiny_models import tiny_model

PROMPT = [2, 17, 45, 301, 9, 88]


def quantized_tiny(family: str, scheme: str, dtype=torch.float32, **overrides):
    """A fresh tiny model (quantizing changes it in place) whose layers int4's 64-row blocks fit."""
    loaded = tiny_model(family, dtype, **{"num_key_value_heads": 4, **overrides})
    quantize_model(loaded.model, scheme)
    return dataclasses.replace(loaded, quantization=scheme)


def reference_weight(weight: torch.Tensor, scheme: str) -> torch.Tensor:
    """The dequantized weight computed from the codes alone (not through the packed kernel)."""
    if scheme == "int8":
        q, scales = quantize_int8(weight)
        return q.float() * scales.float()[:, None]
    q, scale, zero = int4_codes(weight)
    n, k = weight.shape
    groups = (q.float().reshape(n, k // INT4_GROUP, INT4_GROUP) - 8) * scale[..., None] + zero[..., None]
    return groups.reshape(n, k)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 37])
def test_packed_kernel_matches_the_dequantized_reference(scheme, rows):
    torch.manual_seed(0)
    weight = torch.randn(192, 256) * 0.05
    layer = QuantizedLinear.from_weight(weight, scheme)
    x = torch.randn(rows, 256)
    expected = x @ reference_weight(weight, scheme).t()
    torch.testing.assert_close(layer(x), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(layer.dequantized(), reference_weight(weight, scheme), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_int8_gemv_matches_the_dequantized_reference(dtype):
    """One row inside torch.compile takes inductor's multiply-and-sum (`int8_gemv`), its input
    produced by an RMSNorm-like op as in the step; two rows take aten's kernel."""
    torch.manual_seed(0)
    weight = torch.randn(192, 256) * 0.05
    layer = QuantizedLinear.from_weight(weight.to(dtype), "int8")
    norm = torch.rand(256, dtype=dtype) + 0.5

    def normed(x):
        return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(dtype) * norm

    compiled = torch.compile(lambda x: layer(normed(x)), fullgraph=True)
    dequantized = quantize_int8(weight.to(dtype))[0].float() * layer.scales.float()[:, None]
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for rows in (1, 2):
        x = torch.randn(rows, 256, dtype=dtype)
        torch.testing.assert_close(compiled(x).float(), normed(x).float() @ dequantized.t(), **tolerance)
        if dtype == torch.float32:  # and equal to the eager layer (aten's kernel) to rounding
            torch.testing.assert_close(compiled(x), layer(normed(x)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantization_error_is_within_half_a_step(scheme):
    torch.manual_seed(1)
    weight = torch.randn(128, 128) * 0.05
    error = (reference_weight(weight, scheme) - weight).abs()
    if scheme == "int8":
        step = weight.abs().amax(1, keepdim=True) / 127
        assert (error <= step / 2 + 1e-7).all()
    else:
        _, scale, _ = int4_codes(weight)
        step = scale.repeat_interleave(INT4_GROUP, dim=1)
        assert (error <= step / 2 + 1e-7).all()


def test_int4_gives_back_a_grid_the_weights_already_lie_on():
    """Weights that were 4-bit already (the embedded model is a Q4_1 file) come back exactly,
    even in groups that use only part of the 16 levels."""
    torch.manual_seed(2)
    n, k = 64, 128
    step = torch.rand(n, k // INT4_GROUP, 1) * 0.01 + 0.001
    low = torch.randn(n, k // INT4_GROUP, 1) * 0.05
    codes = torch.randint(2, 13, (n, k // INT4_GROUP, INT4_GROUP)).float()
    codes[..., 0], codes[..., 1] = 2, 12  # every group spans codes 2..12: 10 of the 15 steps
    weight = (low + codes * step).reshape(n, k)
    torch.testing.assert_close(reference_weight(weight, "int4"), weight, rtol=0, atol=1e-6)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_fused_rows_equal_the_separate_layers(scheme):
    torch.manual_seed(3)
    parts = [QuantizedLinear.from_weight(torch.randn(n, 128) * 0.05, scheme) for n in (128, 64, 64)]
    fused = QuantizedLinear.cat(parts)
    x = torch.randn(2, 128)
    torch.testing.assert_close(fused(x), torch.cat([p(x) for p in parts], dim=-1), rtol=0, atol=0)
    torch.testing.assert_close(fused.rows(128, 192)(x), parts[1](x), rtol=0, atol=0)


@pytest.mark.parametrize("family,scheme", [("llama", "int8"), ("llama", "int4"), ("qwen3", "int4"),
                                           ("gemma3", "int8")])
@pytest.mark.parametrize("compile,slots", [(False, 2), (True, 2), (True, 1)])
def test_engine_tokens_equal_hf_generate_on_the_quantized_model(family, scheme, compile, slots):
    """fp32: the fused runner (llama, qwen3) or Hugging Face's modules (gemma3) over the same
    quantized layers give Hugging Face's greedy tokens exactly; one compiled slot multiplies
    the int8 layers (and int4's int8 head) as `int8_gemv`, two through aten's kernel."""
    from oc_engine import LLM, SamplingParams

    loaded = quantized_tiny(family, scheme)
    expected = hf_greedy(loaded, PROMPT, 24)
    with LLM(loaded, EngineConfig(compile=compile, max_num_seqs=slots, max_model_len=64), UNGUARDED) as llm:
        got = llm.generate([PROMPT], SamplingParams(max_tokens=24, ignore_eos=True))[0].token_ids
    assert list(got) == expected


def test_quantized_engine_with_attention_bounded_by_the_live_span():
    """A cache over 512 positions: attention reads only the live span, beside the packed matmuls."""
    from oc_engine import LLM, SamplingParams

    loaded = quantized_tiny("llama", "int4", max_position_embeddings=1024)
    expected = hf_greedy(loaded, PROMPT, 16)
    with LLM(loaded, EngineConfig(compile=True, max_num_seqs=2, max_model_len=700), UNGUARDED) as llm:
        assert llm.runner.span_attention
        got = llm.generate([PROMPT], SamplingParams(max_tokens=16, ignore_eos=True))[0].token_ids
    assert list(got) == expected


def test_quantized_step_compiles_once(monkeypatch):
    """Sampling settings, probe thresholds and requests coming and going: one graph per step."""
    import torch._dynamo

    from oc_engine import LLM, SamplingParams

    loaded = quantized_tiny("llama", "int4")
    probe = make_probe(loaded.model, bias=-20.0)
    with LLM(loaded, EngineConfig(compile=True, max_num_seqs=3, max_model_len=64),
             GuardSetup(probe=probe, classifier=None)) as llm:
        llm.generate([PROMPT], SamplingParams(max_tokens=4))  # compiles the greedy step
        llm.generate([PROMPT], SamplingParams(max_tokens=4, temperature=0.7, seed=1))  # and the sampled one
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = llm.generate([PROMPT, PROMPT[:3], PROMPT[1:]],
                                [SamplingParams(max_tokens=8), SamplingParams(max_tokens=5, temperature=1.2, top_p=0.9,
                                                                              seed=3),
                                 SamplingParams(max_tokens=7, top_k=5, temperature=0.5, seed=4)])
    assert [len(o.token_ids) for o in outs] == [8, 5, 7]


def test_weights_shrink_and_the_head_stays_int8_under_int4():
    plain = tiny_model("llama", torch.bfloat16, num_key_value_heads=4)
    before = linear_weight_bytes(plain.model)
    int4 = quantized_tiny("llama", "int4", torch.bfloat16)
    head = int4.model.get_output_embeddings()
    assert isinstance(head, QuantizedLinear) and head.scheme == "int8"
    assert linear_weight_bytes(int4.model) < before / 2.5
    int8 = quantized_tiny("llama", "int8", torch.bfloat16)
    assert before / 2.2 < linear_weight_bytes(int8.model) < before / 1.8


def test_probe_fingerprint_records_the_quantization(tmp_path):
    from oc_engine.guard.probe import ModelFingerprint, load_probe, save_probe

    loaded = quantized_tiny("llama", "int8")
    assert ModelFingerprint.of(loaded.model).quantization == "int8"
    save_probe(make_probe(loaded.model, bias=0.0), tmp_path / "probe")
    assert load_probe(tmp_path / "probe").config.model.quantization == "int8"
    load_probe(tmp_path / "probe").check_model(loaded.model)


def test_unquantized_probe_on_a_quantized_model_needs_a_passing_record():
    from oc_engine import LLM
    from oc_engine.training.probe_revalidation import with_record

    plain = tiny_model("llama", num_key_value_heads=4)
    probe = make_probe(plain.model, bias=-20.0)  # made on the unquantized model
    loaded = quantized_tiny("llama", "int4")
    with pytest.raises(OcEngineError, match="never re-validated there.*revalidate-probe --quantize int4"):
        LLM(loaded, EngineConfig(compile=False), GuardSetup(probe=probe, classifier=None))
    failed = with_record(probe, {"quantization": "int4", "validation_auroc": 0.7, "reference_auroc": 0.9,
                                 "tolerance": 0.02, "passed": False, "quantizer_version": QUANTIZER_VERSION})
    with pytest.raises(OcEngineError, match="AUROC there was 0.7 against 0.9"):
        LLM(loaded, EngineConfig(compile=False), GuardSetup(probe=failed, classifier=None))
    with pytest.raises(OcEngineError, match="revalidate-probe --quantize int4"):  # an int8 record is not int4's
        LLM(loaded, EngineConfig(compile=False),
            GuardSetup(probe=with_record(probe, {"quantization": "int8", "passed": True}), classifier=None))
    passed = with_record(probe, {"quantization": "int4", "validation_auroc": 0.89, "reference_auroc": 0.9,
                                 "tolerance": 0.02, "passed": True, "quantizer_version": QUANTIZER_VERSION})
    stale = with_record(probe, dict(passed.revalidation("int4"), quantizer_version=QUANTIZER_VERSION - 1))
    with pytest.raises(OcEngineError, match="another version of the quantizer"):
        LLM(loaded, EngineConfig(compile=False), GuardSetup(probe=stale, classifier=None))
    with LLM(loaded, EngineConfig(compile=False, max_model_len=32), GuardSetup(probe=passed, classifier=None)) as llm:
        assert llm.generate([PROMPT])[0].guard.status is not None
    with pytest.raises(OcEngineError, match="made on the int4 model and this one is unquantized: run with "
                                            "--quantize int4"):
        LLM(plain, EngineConfig(compile=False), GuardSetup(probe=make_probe(loaded.model, bias=0.0), classifier=None))


def test_old_probe_configs_without_the_field_load_as_unquantized(tmp_path):
    import json

    from oc_engine.guard.probe import CONFIG_FILE, load_probe, save_probe

    plain = tiny_model("llama")
    save_probe(make_probe(plain.model, bias=0.0), tmp_path / "probe")
    raw = json.loads((tmp_path / "probe" / CONFIG_FILE).read_text())
    del raw["model"]["quantization"]
    (tmp_path / "probe" / CONFIG_FILE).write_text(json.dumps(raw))
    assert load_probe(tmp_path / "probe").config.model.quantization is None
    raw["model"]["quantization"] = "int3"
    (tmp_path / "probe" / CONFIG_FILE).write_text(json.dumps(raw))
    with pytest.raises(OcEngineError, match="'quantization' must be int8, int4 or null"):
        load_probe(tmp_path / "probe")


def test_unsupported_quantization_fails_before_anything_changes():
    from oc_engine import LLM

    loaded = tiny_model("llama")  # k and v have 32 rows: not a whole 64-row int4 block
    before = {n: p.clone() for n, p in loaded.model.named_parameters()}
    with pytest.raises(OcEngineError, match="int4 needs layers whose .* outputs a multiple of 64.*int8"):
        quantize_model(loaded.model, "int4")
    assert all(torch.equal(p, before[n]) for n, p in loaded.model.named_parameters())
    assert not any(isinstance(m, QuantizedLinear) for m in loaded.model.modules())
    with pytest.raises(OcEngineError, match="unknown quantization 'int3'"):
        quantize_model(loaded.model, "int3")
    with pytest.raises(OcEngineError, match="this LoadedModel is not quantized"):
        LLM(loaded, EngineConfig(quantize="int8"), UNGUARDED)
    quantize_model(loaded.model, "int8")
    with pytest.raises(OcEngineError, match="already quantized"):
        quantize_model(loaded.model, "int8")


def test_revalidate_probe_command_records_and_unlocks_the_quantized_model(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from click.testing import CliRunner

    from oc_engine.cli import main
    from oc_engine.guard.probe import load_probe

    monkeypatch.setenv("OC_ENGINE_CACHE", str(tmp_path / "cache"))
    root = tiny_model_dir(0.0)
    rows = [{"prompt": f"w{20 + i} w9", "response": f"w{100 + (i % 3) * 100} w{101 + (i % 3) * 100} w{400 + i % 7}",
             "label": i % 3} for i in range(60)]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    generate = ["generate", "--model", str(root / "model"), "--dtype", "float32", "--quantize", "int8", "--prompt",
                "w5 w6 w7", "--no-chat-template", "--no-compile", "--max-new-tokens", "4", "--json"]
    refused = CliRunner().invoke(main, [*generate, "--probe", str(root / "probe")])
    assert refused.exit_code != 0 and "revalidate-probe --quantize int8" in refused.output
    revalidate = ["revalidate-probe", "--model", str(root / "model"), "--probe", str(root / "probe"), "--dtype",
                  "float32", "--quantize", "int8", "--data", str(data), "--validation", "0.3",
                  "--max-response-tokens", "8", "--json"]
    neither = CliRunner().invoke(main, revalidate)
    assert neither.exit_code != 0 and "give --out DIR" in neither.output
    result = CliRunner().invoke(main, [*revalidate, "--tolerance", "1", "--out", str(tmp_path / "checked")])
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["passed"] and record["exchanges"] > 0 and 0 <= record["validation_auroc"] <= 1
    assert load_probe(tmp_path / "checked").revalidation("int8") == record
    assert load_probe(root / "probe").revalidation("int8") is None  # the original is untouched
    accepted = CliRunner().invoke(main, [*generate, "--probe", str(tmp_path / "checked")])
    assert accepted.exit_code == 0, accepted.output
    assert json.loads(accepted.stdout.splitlines()[-1])["status"] in ("completed", "blocked")


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_the_shipped_probe_guards_the_quantized_embedded_model(scheme):
    """The shipped probe carries passing re-validation records for both quantizations, made with
    the current quantizer, so the embedded model runs guarded with --quantize out of the box."""
    from oc_engine import LLM, SamplingParams
    from oc_engine.guard.probe import load_probe
    from oc_engine.models.embedded import default_probe_dir

    record = load_probe(default_probe_dir()).revalidation(scheme)
    assert record["passed"] and record["quantizer_version"] == QUANTIZER_VERSION
    assert record["validation_auroc"] >= record["reference_auroc"] - record["tolerance"]
    with LLM(None, EngineConfig(compile=False, max_num_seqs=1, max_model_len=128, quantize=scheme)) as llm:
        completion = llm.generate(["What is the capital of France?"], SamplingParams(max_tokens=8))[0]
    assert llm.loaded.quantization == scheme and completion.guard is not None and completion.token_ids
