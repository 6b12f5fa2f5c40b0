"""Model runners: one forward contract over different model families.

    runner(input_ids [B, T], pos [B, T], cache_rows, taps, span, last) -> (logits [B, V] fp32, tapped [L, B, H] | None)

Logits and the tapped hidden states (one per entry of `taps`) are for the last of the T positions,
or for each row's `last` [B] (prompts of different lengths, right-padded into one batch).
"""

from torch import nn

from oc_engine.engine.runners.fused_llama import FusedLlamaRunner, supports_fused
from oc_engine.engine.runners.hf_modules import HFModulesRunner


def build_runner(model: nn.Module, prefer_fused: bool = True) -> nn.Module:
    """The fused Llama-family runner where it applies, else Hugging Face's own modules."""
    if prefer_fused and supports_fused(model):
        return FusedLlamaRunner(model)
    return HFModulesRunner(model)


__all__ = ["FusedLlamaRunner", "HFModulesRunner", "build_runner", "supports_fused"]
