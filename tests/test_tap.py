"""The tap equals Hugging Face's output_hidden_states[layer] at the position each token was produced."""

import pytest
import torch

from probe_helpers import fixed, plain_llm

PROMPT = [2, 17, 99, 45, 300, 12, 7, 8, 9, 10, 11, 13]


def _check_taps(loaded, tap, compile):
    result = plain_llm(loaded, compile=compile, tap=tap).run([PROMPT], fixed(6), collect_taps=True)[0]
    assert len(result.taps) == len(result.token_ids) == 6
    sequence = PROMPT + result.token_ids[:-1]
    with torch.inference_mode():
        hidden = loaded.model(torch.tensor([sequence]), output_hidden_states=True).hidden_states[tap][0]
    for j, tapped in enumerate(result.taps):
        torch.testing.assert_close(tapped, hidden[len(PROMPT) - 1 + j].float(), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3", "gemma4"])
@pytest.mark.parametrize("tap", [0, 1, -2, -1])
def test_tap_matches_output_hidden_states(tiny, family, tap):
    _check_taps(tiny(family), tap, compile=False)


def test_tap_compiled(tiny):
    _check_taps(tiny("llama"), -2, compile=True)


def test_tap_out_of_range_is_a_clear_error(tiny):
    from oc_engine.errors import OcEngineError

    with pytest.raises(OcEngineError, match="out of range"):
        plain_llm(tiny("llama"), tap=7)


def test_no_tap_returns_nothing(tiny):
    result = plain_llm(tiny("llama")).run([PROMPT], fixed(3), collect_taps=True)[0]
    assert result.taps == []
