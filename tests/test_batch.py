"""A prompt's result in a batch equals its result alone; sequences finish on their own."""

import pytest

from oc_engine.engine.decode import Engine, GenerationConfig

PROMPTS = [[2, 17, 99, 45, 300], [2, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 120], [2, 400, 401, 402, 403, 4, 8, 9]]


@pytest.mark.parametrize("family,compile", [("llama", False), ("gemma4", False), ("llama", True)])
def test_batch_equals_single(tiny, family, compile):
    engine = Engine(tiny(family), compile=compile)
    config = GenerationConfig(max_new_tokens=16, ignore_eos=True)
    batch = engine.generate(PROMPTS, config)
    for prompt, result in zip(PROMPTS, batch):
        assert result.token_ids == engine.generate([prompt], config)[0].token_ids


def test_sequences_finish_on_their_own(tiny):
    engine = Engine(tiny("llama"), compile=False)
    config = GenerationConfig(max_new_tokens=16)
    alone = [engine.generate([p], GenerationConfig(max_new_tokens=16, ignore_eos=True))[0].token_ids
             for p in PROMPTS]
    engine.eos_ids = {alone[0][3]}  # the first prompt's 4th token ends that sequence early
    eos = alone[0][3]
    for tokens, result in zip(alone, engine.generate(PROMPTS, config)):
        if eos in tokens:
            assert result.token_ids == tokens[: tokens.index(eos) + 1]
            assert result.finish_reason == "eos"
        else:
            assert result.token_ids == tokens
            assert result.finish_reason == "length"
    assert engine.generate(PROMPTS, config)[0].finish_reason == "eos"


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_reading_outputs_a_step_late_changes_nothing(tiny, compile):
    """The CUDA pipeline (host reads each step's outputs one step behind), run on CPU."""
    loaded = tiny("llama")
    config = GenerationConfig(max_new_tokens=16)
    direct = Engine(loaded, compile=compile, output_lag=0)
    lagged = Engine(loaded, compile=compile, output_lag=1)
    eos = direct.generate([PROMPTS[0]], GenerationConfig(max_new_tokens=16, ignore_eos=True))[0].token_ids[3]
    direct.eos_ids = lagged.eos_ids = {eos}  # one row ends early, the others run on
    for a, b in zip(direct.generate(PROMPTS, config), lagged.generate(PROMPTS, config)):
        assert (a.token_ids, a.text, a.finish_reason) == (b.token_ids, b.text, b.finish_reason)
