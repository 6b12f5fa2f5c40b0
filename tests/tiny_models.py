"""Tiny random models built from configs (no hub), and a word-level tokenizer to match."""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, decoders
from transformers import PreTrainedTokenizerFast

from oc_engine.models.loading import LoadedModel

VOCAB = 512


def tiny_tokenizer(vocab: int = VOCAB) -> PreTrainedTokenizerFast:
    words = {f"w{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w3"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w2", eos_token="w1", pad_token="w0",
                                   unk_token="w3")


def _config(family: str, **overrides):
    from transformers import Gemma3TextConfig, Gemma4TextConfig, LlamaConfig, Qwen3Config

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256, pad_token_id=0,
                  eos_token_id=1, bos_token_id=2)
    common.update(overrides)
    if family == "llama":
        return LlamaConfig(num_hidden_layers=3, tie_word_embeddings=False, **common)
    if family == "qwen3":
        return Qwen3Config(num_hidden_layers=3, tie_word_embeddings=True, **common)
    if family == "gemma3":
        return Gemma3TextConfig(num_hidden_layers=4, sliding_window=8, final_logit_softcapping=30.0,
                                layer_types=["sliding_attention", "full_attention"] * 2,
                                query_pre_attn_scalar=16, **common)
    if family == "gemma4":
        return Gemma4TextConfig(num_hidden_layers=6, sliding_window=8, num_kv_shared_layers=2,
                                hidden_size_per_layer_input=16, vocab_size_per_layer_input=VOCAB,
                                final_logit_softcapping=30.0, global_head_dim=32,
                                layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
                                **common)
    raise ValueError(family)


FAMILIES = ("llama", "qwen3", "gemma3", "gemma4")


def tiny_model(family: str, dtype: torch.dtype = torch.float32, seed: int = 0, **overrides) -> LoadedModel:
    """overrides: config fields (e.g. num_key_value_heads=4, which int4's 64-row blocks need)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(family, **overrides)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    # Random init is near-uniform; widen it so greedy decoding has clear winners.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    model.eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), source=f"tiny-{family}",
                       device=torch.device("cpu"), dtype=dtype)


def tiny_gemma4_multimodal(dtype: torch.dtype = torch.float32) -> LoadedModel:
    """A Gemma4ForConditionalGeneration (how Gemma 4 checkpoints ship) with the tiny text config."""
    from transformers import Gemma4Config, Gemma4ForConditionalGeneration

    torch.manual_seed(0)
    config = Gemma4Config(text_config=_config("gemma4").to_dict(), vision_config=None, audio_config=None)
    model = Gemma4ForConditionalGeneration(config).to(dtype).eval().requires_grad_(False)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.08)
    return LoadedModel(model=model, tokenizer=tiny_tokenizer(), source="tiny-gemma4-multimodal",
                       device=torch.device("cpu"), dtype=dtype)
