"""Sampling: the exponential race draws from the right distribution; seeds reproduce."""

import time

import pytest
import torch

from oc_engine.engine.sampling import SamplingConfig, sample
from oc_engine.errors import OcEngineError
from probe_helpers import fixed, plain_llm

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
    llm = plain_llm(tiny("llama"))
    params = fixed(16, seed=123, temperature=1.0, top_p=0.95)
    first = llm.generate([PROMPT], params)[0].token_ids
    assert llm.generate([PROMPT], params)[0].token_ids == first
    assert llm.generate([PROMPT], fixed(16, seed=124, temperature=1.0, top_p=0.95))[0].token_ids != first


def test_top_k_one_is_greedy(tiny):
    llm = plain_llm(tiny("llama"))
    greedy = llm.generate([PROMPT], fixed(10))[0].token_ids
    assert llm.generate([PROMPT], fixed(10, seed=5, temperature=1.5, top_k=1))[0].token_ids == greedy


def test_rows_with_other_parameters_share_a_step_and_keep_their_tokens(tiny):
    """Greedy and sampled requests decoded together get the tokens they get alone."""
    llm = plain_llm(tiny("llama"))
    params = [fixed(12), fixed(12, seed=3, temperature=1.0, top_k=20), fixed(12, seed=4, temperature=0.8, top_p=0.9)]
    prompts = [PROMPT, [2, 5, 6, 7], [2, 9, 8]]
    together = llm.generate(prompts, params)
    for i, (prompt, p) in enumerate(zip(prompts, params)):
        # a seeded request's stream is keyed by its seed and its index in the call
        alone = llm.generate([[2]] * i + [prompt], [fixed(1)] * i + [p])[i]
        assert alone.token_ids == together[i].token_ids


def test_each_row_samples_from_its_own_stream():
    """A row's draw depends on its key and position only, not on the rows beside it."""
    logits = torch.randn(6, 300, generator=torch.Generator().manual_seed(0))
    keys, positions = torch.arange(100, 106), torch.arange(6) * 7
    config = SamplingConfig(temperature=1.0, top_p=0.9)
    together = sample(logits, config, keys, positions)
    alone = torch.cat([sample(logits[i:i + 1], config, keys[i:i + 1], positions[i:i + 1]) for i in range(6)])
    assert torch.equal(together, alone)
    assert not torch.equal(sample(logits, config, keys + 1000, positions), together)  # other keys: other draws
    assert not torch.equal(sample(logits, config, keys, positions + 1), together)  # other positions too


def test_uniforms_look_uniform_and_independent():
    from oc_engine.engine.sampling import uniforms

    u = uniforms(torch.arange(2000), torch.zeros(2000, dtype=torch.long), 256)
    assert 0 < float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 0.002 and abs(float(u.std()) - 12 ** -0.5) < 0.002
    histogram = torch.histc(u, bins=32, min=0, max=1) / u.numel() * 32
    assert float((histogram - 1).abs().max()) < 0.03
    shifted = uniforms(torch.arange(2000), torch.ones(2000, dtype=torch.long), 256)  # the next position
    assert abs(float(torch.corrcoef(torch.stack([u.flatten(), shifted.flatten()]))[0, 1])) < 0.01


def test_sampled_tokens_do_not_depend_on_verdict_latency(tiny):
    """Every token pauses and each sequence may hold one token only, so each row waits for
    every verdict while the other decodes: with slow or fast verdicts, the same sampled tokens
    and the same decisions (one random stream per sequence; a shared one would differ)."""
    from probe_helpers import FakeClassifier, guarded_run, make_probe

    loaded = tiny("llama")
    probe = make_probe(loaded.model, bias=20.0)
    params = fixed(8, seed=7, temperature=1.0)
    prompts = [PROMPT, [2, 5, 6, 7, 8, 9]]
    outcomes = []
    for delays in ((0.0, 0.0), (0.02, 0.0), (0.0, 0.03)):
        classifier = FakeClassifier("allow")
        classifier.delays = iter(delays * 20)
        classifier._run = lambda c=classifier: (time.sleep(next(c.delays)), {"verdict": "allow", "p_unsafe": 0.1})[1]
        seqs, shown = guarded_run(loaded, probe, classifier, prompts, params, max_held=1)
        outcomes.append([(s.token_ids, text) for s, text in zip(seqs, shown)])
    assert outcomes[0] == outcomes[1] == outcomes[2]
