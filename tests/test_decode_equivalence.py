"""Greedy tokens equal Hugging Face generate in fp32, eager and compiled."""

import pytest

from conftest import hf_greedy
from oc_engine.engine.prompts import render_prompt
from oc_engine.engine.runners import FusedLlamaRunner, HFModulesRunner
from probe_helpers import fixed, plain_llm
from tiny_models import FAMILIES

# 14 prompt tokens + 24 new tokens: well past the tiny Gemma models' sliding window of 8.
PROMPT = [2, 17, 99, 45, 300, 12, 7, 8, 9, 10, 11, 13, 200, 201]
FIXED = fixed(24)


@pytest.mark.parametrize("family", FAMILIES)
def test_eager_matches_hf_generate(tiny, family):
    loaded = tiny(family)
    llm = plain_llm(loaded)
    expected_runner = FusedLlamaRunner if family in ("llama", "qwen3") else HFModulesRunner
    assert isinstance(llm.runner.runner, expected_runner)
    result = llm.generate([PROMPT], FIXED)[0]
    assert list(result.token_ids) == hf_greedy(loaded, PROMPT, 24)
    assert result.finish_reason == "length"


@pytest.mark.parametrize("family", ["llama", "gemma4"])
def test_compiled_matches_hf_generate(tiny, family):
    loaded = tiny(family)
    llm = plain_llm(loaded, compile=True)
    assert list(llm.generate([PROMPT], FIXED)[0].token_ids) == hf_greedy(loaded, PROMPT, 24)


def test_hf_runner_matches_on_llama_too(tiny):
    """The generic runner (Hugging Face modules + engine cache) is exact on Llama as well."""
    loaded = tiny("llama")
    llm = plain_llm(loaded, prefer_fused=False)
    assert isinstance(llm.runner.runner, HFModulesRunner)
    assert list(llm.generate([PROMPT], FIXED)[0].token_ids) == hf_greedy(loaded, PROMPT, 24)


@pytest.mark.slow
@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_embedded_model_matches_hf_generate(embedded_fp32, compile):
    prompt = render_prompt(embedded_fp32.tokenizer, "Explain SQL injection at a high level")
    llm = plain_llm(embedded_fp32, compile=compile, max_model_len=256)
    result = llm.generate([prompt], fixed(48))[0]
    assert list(result.token_ids) == hf_greedy(embedded_fp32, prompt, 48)
    assert "SQL" in result.text


def test_gemma4_conditional_generation_is_served_through_its_text_model():
    from tiny_models import tiny_gemma4_multimodal

    loaded = tiny_gemma4_multimodal()
    llm = plain_llm(loaded, tap=-2)
    assert isinstance(llm.runner.runner, HFModulesRunner)
    assert llm.runner.runner.text_model is loaded.model.model.language_model
    assert list(llm.generate([PROMPT], FIXED)[0].token_ids) == hf_greedy(loaded, PROMPT, 24)
