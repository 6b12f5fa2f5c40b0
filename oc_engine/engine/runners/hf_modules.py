"""Run any Hugging Face decoder (Gemma 3, Gemma 4, ...) with the engine's cache and masks.

transformers' own StaticCache keeps a Python int position for sliding-window layers, which
makes the compiled step recompile every token for Gemma 3/4. Here the model's text stack is
called with precomputed masks (one per layer type, built from device positions) and a Cache
whose `update` writes into the engine's static buffers by index, so the step sees only
tensors and never recompiles. Gemma 4's shared-KV layers read the full-length K/V that its
"store" layers receive from this cache, so they need no special case.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import Cache

from oc_engine.engine.kv_cache import CacheRows
from oc_engine.engine.masks import attention_mask
from oc_engine.engine.runners.common import last_positions


class EngineCache(Cache):
    """A transformers Cache over the engine's static buffers, for one forward call."""

    def __init__(self, rows: CacheRows, pos: torch.Tensor, span=None):  # noqa: D107 - bypasses Cache.__init__
        # Cache.__init__ sets up offloading and layer factories that this cache never uses.
        self.layers = []
        self.layer_class_to_replicate = None
        self.offloading = False
        self._rows, self._pos, self._span = rows, pos, span

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        return self._rows.write(layer_idx, key_states, value_states, self._pos, self._span)

    @property
    def is_compileable(self) -> bool:
        return True

    def get_seq_length(self, layer_idx: int = 0) -> int:
        raise RuntimeError("the engine passes position_ids; the cache length is never needed")


def text_parts(model: nn.Module) -> tuple[nn.Module, nn.Module, object]:
    """(text decoder stack, lm_head, text config) of a causal LM or a multimodal wrapper."""
    inner = model.model
    text_model = getattr(inner, "language_model", inner)
    return text_model, model.get_output_embeddings(), model.config.get_text_config()


def cache_kwarg(text_model: nn.Module) -> str:
    """The name the text stack's forward gives its cache: `cache` in newer transformers (5.24),
    `past_key_values` before (5.17, the GPU image's). Passed under the wrong name, the cache
    would be ignored and the model would build its own."""
    params = inspect.signature(type(text_model).forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class HFModulesRunner(nn.Module):
    """Same contract as FusedLlamaRunner: (logits [B, V] fp32, tapped [len(taps), B, H] | None), last
    position (or each row's `last`).
    A `span` bounds attention when given, but the step never gives one: Hugging Face's attention
    folds K/V in matmuls, which a symbolic span cannot go through (see `decode_attention`)."""

    supports_span = False

    def __init__(self, model: nn.Module):
        super().__init__()
        self.text_model, self.lm_head, config = text_parts(model)
        self.num_layers = config.num_hidden_layers
        self.softcap = getattr(config, "final_logit_softcapping", None)
        layer_types = getattr(config, "layer_types", None) or ["full_attention"] * self.num_layers
        window = getattr(config, "sliding_window", None)
        self.windows = {t: (window if t == "sliding_attention" else None) for t in set(layer_types)}
        self.cache_kwarg = cache_kwarg(self.text_model)

    def forward(self, input_ids, pos, cache: CacheRows, taps: tuple[int, ...] = (), span=None, last=None):
        dtype = self.text_model.get_input_embeddings().weight.dtype
        length = cache.max_len if span is None else span
        masks = {t: attention_mask(pos, length, dtype, w) for t, w in self.windows.items()}
        if len(masks) == 1:  # models with one layer type take a prepared 4D mask, not a dict
            (masks,) = masks.values()
        out = self.text_model(input_ids=input_ids, position_ids=pos, attention_mask=masks,
                              **{self.cache_kwarg: EngineCache(cache, pos, span)}, use_cache=True,
                              output_hidden_states=bool(taps))
        hidden = last_positions(out.last_hidden_state, last)
        logits = self.lm_head(hidden).float()
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        tapped = torch.stack([last_positions(out.hidden_states[t], last) for t in taps]) if taps else None
        return logits, tapped

