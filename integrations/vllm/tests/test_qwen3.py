"""The Qwen3 registration, on a tiny random Qwen3 (the embedded tokenizer, 2 layers), started
once for this module: the probe's scores through vLLM equal the native engine's, with a probe
that taps a middle layer and the final norm's output (Hugging Face's last hidden state)."""

import pytest
import torch

from conftest import assert_same_tokens_and_scores, native_unguarded
from oc_engine.config import EngineConfig, GuardSetup
from oc_engine.params import SamplingParams

PROMPTS = [[1, 9690, 198, 2683, 314, 253, 1751], [1, 4093, 28, 940, 1782]]


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory, model_dir, tokenizer):
    from transformers import AutoModelForCausalLM, GenerationConfig, Qwen3Config

    from oc_engine.guard.probe import ModelFingerprint, Probe, ProbeConfig, save_probe

    root = tmp_path_factory.mktemp("qwen3")
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=512,
                         tie_word_embeddings=True, eos_token_id=2, bos_token_id=1, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)  # random init is near-uniform: give greedy decoding clear winners
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    GenerationConfig(eos_token_id=2, bos_token_id=1).save_pretrained(root / "model")
    fingerprint = ModelFingerprint.of(model)
    weight = torch.randn(2, 128, generator=torch.Generator().manual_seed(1)) * 0.3
    probe = Probe(ProbeConfig(model=fingerprint, layers=(1, -1), hidden_size=128, alpha=0.5, warn=0.5, pause=0.9),
                  weight=weight, bias=torch.tensor([0.0]))
    save_probe(probe, root / "probe")
    return root / "model", root / "probe"


def test_qwen3_scores_equal_the_native_probe(tiny_qwen3):
    from oc_engine import LLM
    from oc_engine_vllm import VllmLLM

    model, probe = tiny_qwen3
    params = SamplingParams(max_tokens=16, ignore_eos=True)
    config = EngineConfig(dtype="float32", compile=False, max_num_seqs=2, max_model_len=256)
    with VllmLLM(str(model), config, GuardSetup(probe=probe, classifier=None)) as llm:
        ours = llm.run(PROMPTS, params, guard=None)
    with LLM(str(model), config, GuardSetup(probe=probe, classifier=None)) as native:
        theirs = native_unguarded(native, PROMPTS, params)
    assert_same_tokens_and_scores(ours, theirs)
    assert len({round(s, 3) for seq in ours for s in seq.scores}) > 3  # the probe sees something that varies
