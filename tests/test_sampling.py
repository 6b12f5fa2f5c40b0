"""Sampling: the exponential race draws from the right distribution; seeds reproduce."""

import pytest
import torch

from oc_engine.engine.decode import Engine, GenerationConfig
from oc_engine.engine.sampling import SamplingConfig, sample
from oc_engine.errors import OcEngineError

PROMPT = [2, 17, 99, 45, 300, 12, 7]
PROBS = torch.tensor([0.5, 0.25, 0.15, 0.07, 0.03])


def _frequencies(config: SamplingConfig, draws: int = 40000) -> torch.Tensor:
    torch.manual_seed(0)
    logits = PROBS.log().expand(draws, -1).clone()
    tokens = sample(logits, config)
    return torch.bincount(tokens, minlength=len(PROBS)).float() / draws


def test_exponential_race_matches_the_softmax():
    torch.testing.assert_close(_frequencies(SamplingConfig(temperature=1.0)), PROBS, atol=0.01, rtol=0)


def test_top_k_renormalises_over_the_k_best():
    expected = torch.tensor([0.5, 0.25, 0, 0, 0]) / 0.75
    torch.testing.assert_close(_frequencies(SamplingConfig(temperature=1.0, top_k=2)), expected, atol=0.01, rtol=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    # 0.5 + 0.25 = 0.75 < 0.8, so the third token is needed too.
    expected = torch.tensor([0.5, 0.25, 0.15, 0, 0]) / 0.9
    torch.testing.assert_close(_frequencies(SamplingConfig(temperature=1.0, top_p=0.8)), expected, atol=0.01, rtol=0)


def test_low_temperature_sharpens():
    assert _frequencies(SamplingConfig(temperature=0.1))[0] > 0.99


def test_greedy_is_argmax():
    logits = torch.randn(7, 100)
    assert torch.equal(sample(logits, SamplingConfig()), logits.argmax(-1))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_invalid_sampling_settings_are_rejected(bad):
    with pytest.raises(OcEngineError):
        SamplingConfig(**bad)


def test_seeded_sampling_is_reproducible(tiny):
    engine = Engine(tiny("llama"), compile=False)
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True, seed=123,
                              sampling=SamplingConfig(temperature=1.0, top_p=0.95))
    first = engine.generate([PROMPT], config)[0].token_ids
    assert engine.generate([PROMPT], config)[0].token_ids == first
    other = GenerationConfig(max_new_tokens=16, ignore_eos=True, seed=124, sampling=config.sampling)
    assert engine.generate([PROMPT], other)[0].token_ids != first


def test_top_k_one_is_greedy(tiny):
    engine = Engine(tiny("llama"), compile=False)
    greedy = engine.generate([PROMPT], GenerationConfig(max_new_tokens=10, ignore_eos=True))[0].token_ids
    top1 = GenerationConfig(max_new_tokens=10, ignore_eos=True, seed=5, sampling=SamplingConfig(1.5, top_k=1))
    assert engine.generate([PROMPT], top1)[0].token_ids == greedy
