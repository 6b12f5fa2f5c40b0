"""Collect the target model's hidden states on exchanges, exactly where generation taps them.

An exchange is rendered as generation renders it (`render_prompt` with the chat template,
then the response tokens). At run time the score paired with response token j comes from the
hidden state that *produced* it, at position P + j - 1 (P = prompt length): the prefill's last
position for j = 0, then the position of token j - 1. Collection taps the same positions.

Modes:
- "tokens": every response token j < `max_response_tokens` (rows [E, T] with a mask);
- "final": the last token of the exchange (position P + R - 1), as the original MVP did.

Batches are right-padded (a causal model's earlier positions don't see the padding, so a
sequence's states in a batch equal its states alone) and sorted by length to waste little.
Results are cached as safetensors shards under the user cache, keyed by the model
fingerprint, layers, mode and a hash of the data, so sweeps and retraining don't recompute.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Sequence

import torch
from safetensors.torch import load_file, save_file

from oc_engine.data import Exchange
from oc_engine.engine.prompts import render_messages, render_prompt
from oc_engine.errors import OcEngineError
from oc_engine.guard.probe import ModelFingerprint

SHARD_EXCHANGES = 512


@dataclass(frozen=True)
class CollectSpec:
    layers: tuple[int, ...]  # indices into output_hidden_states, normalised to 0..num_layers
    mode: str = "tokens"  # "tokens" or "final"
    max_response_tokens: int = 64
    max_prompt_tokens: int = 512  # longer prompts keep their last tokens (the chat template's end)
    chat_template: bool = True

    def __post_init__(self):
        if self.mode not in ("tokens", "final"):
            raise OcEngineError(f"collection mode must be 'tokens' or 'final', got {self.mode!r}")
        if not self.layers:
            raise OcEngineError("collect at least one layer")
        if self.max_response_tokens < 1 or self.max_prompt_tokens < 8:
            raise OcEngineError("max response tokens must be >= 1 and max prompt tokens >= 8")


@dataclass
class Activations:
    """features [E, T, L, H] (T = 1 in final mode; bf16), mask [E, T] (valid token rows)."""

    features: torch.Tensor
    mask: torch.Tensor
    labels: torch.Tensor  # [E] int64, 0/1/2
    prompts: list[str]
    layers: tuple[int, ...]

    def layer(self, layer: int) -> "Activations":
        index = self.layers.index(layer)
        return Activations(self.features[:, :, index:index + 1], self.mask, self.labels, self.prompts, (layer,))

    def subset(self, rows: Sequence[int]) -> "Activations":
        rows = torch.as_tensor(list(rows), dtype=torch.long)
        return Activations(self.features[rows], self.mask[rows], self.labels[rows],
                           [self.prompts[i] for i in rows.tolist()], self.layers)


def exchange_ids(tokenizer, exchange: Exchange, spec: CollectSpec) -> tuple[list[int], int]:
    """(token ids, prompt length P) for an exchange, as generation renders it (behind its context,
    a system prompt and earlier turns, when it has one); truncated per spec."""
    if exchange.context:
        prompt_ids = render_messages(tokenizer, exchange.messages())
        response_ids = list(tokenizer(exchange.response, add_special_tokens=False)["input_ids"]) \
            if exchange.response else []
    else:
        prompt_ids = render_prompt(tokenizer, exchange.prompt, chat_template=spec.chat_template)
        full = render_prompt(tokenizer, exchange.prompt, chat_template=spec.chat_template,
                             response=exchange.response)
        response_ids = full[len(prompt_ids):]
    if len(prompt_ids) > spec.max_prompt_tokens:
        prompt_ids = prompt_ids[-spec.max_prompt_tokens:]
    if spec.mode == "tokens":
        response_ids = response_ids[:spec.max_response_tokens]
    else:
        response_ids = response_ids[:4 * spec.max_response_tokens]
    return prompt_ids + response_ids, len(prompt_ids)


def positions(prompt_len: int, total: int, spec: CollectSpec) -> list[int]:
    """The positions whose hidden states score the response tokens (see the module docstring)."""
    response = total - prompt_len
    if spec.mode == "final":
        return [total - 1]
    return [prompt_len + j - 1 for j in range(response)]


def collect(model, tokenizer, exchanges: list[Exchange], spec: CollectSpec, *, batch_size: int = 8,
            cache: bool = True, progress: bool = True) -> Activations:
    """Hidden states of `model` for `exchanges` (see the module docstring); cached on disk."""
    directory = _cache_dir(model, exchanges, spec) if cache else None
    if directory is not None and (directory / "meta.json").is_file():
        return _load(directory, exchanges, spec)
    from tqdm.auto import tqdm

    encoded = [exchange_ids(tokenizer, e, spec) for e in exchanges]
    # Wide enough for the longest response kept, not for max_response_tokens itself: a huge limit
    # must not allocate a huge buffer.
    longest = max((len(ids) - prompt_len for ids, prompt_len in encoded), default=1)
    width = 1 if spec.mode == "final" else max(1, min(spec.max_response_tokens, longest))
    hidden = model.config.get_text_config().hidden_size
    features = torch.zeros(len(exchanges), width, len(spec.layers), hidden, dtype=torch.bfloat16)
    mask = torch.zeros(len(exchanges), width, dtype=torch.bool)
    order = sorted(range(len(exchanges)), key=lambda i: len(encoded[i][0]))
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    with torch.inference_mode(), tqdm(total=len(order), desc="collect activations", unit="exchange",
                                      disable=not progress) as bar:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            longest = max(len(encoded[i][0]) for i in chunk)
            ids = torch.full((len(chunk), longest), pad, dtype=torch.long)
            attention = torch.zeros((len(chunk), longest), dtype=torch.long)
            for row, i in enumerate(chunk):
                seq = encoded[i][0]
                ids[row, :len(seq)] = torch.tensor(seq)
                attention[row, :len(seq)] = 1
            states = model(input_ids=ids.to(device), attention_mask=attention.to(device),
                           output_hidden_states=True).hidden_states
            stacked = torch.stack([states[layer] for layer in spec.layers], dim=2)  # [B, S, L, H]
            for row, i in enumerate(chunk):
                seq, prompt_len = encoded[i]
                where = positions(prompt_len, len(seq), spec)[:width]
                features[i, :len(where)] = stacked[row, where].to(torch.bfloat16).cpu()
                mask[i, :len(where)] = True
            bar.update(len(chunk))
    labels = torch.tensor([e.label for e in exchanges], dtype=torch.long)
    result = Activations(features, mask, labels, [e.prompt for e in exchanges], spec.layers)
    if directory is not None:
        _save(directory, result, spec)
    return result


def normalize_layers(layers: Sequence[int], num_layers: int) -> tuple[int, ...]:
    points = num_layers + 1
    for layer in layers:
        if not -points <= layer < points:
            raise OcEngineError(f"layer {layer} is out of range (hidden states 0..{num_layers})")
    return tuple(sorted({layer % points for layer in layers}))


# -- cache --------------------------------------------------------------------------------
def _cache_dir(model, exchanges: list[Exchange], spec: CollectSpec) -> Path:
    from oc_engine.models.embedded import cache_root
    from oc_engine.models.quantize import QUANTIZER_VERSION

    fingerprint = ModelFingerprint.of(model)
    digest = hashlib.sha256()
    described = asdict(fingerprint)
    if described["quantization"] is None:  # unquantized keys stay as they were before the field existed
        del described["quantization"]
    else:  # a change to the quantizer changes the activations
        described["quantization"] += f"/{QUANTIZER_VERSION}"
    digest.update(json.dumps([described, asdict(spec), str(next(model.parameters()).dtype)]).encode())
    for e in exchanges:  # an exchange without a context keys as it did before contexts existed
        digest.update(json.dumps([e.prompt, e.response, e.label] + ([list(e.context)] if e.context else [])).encode())
    layers = "-".join(map(str, spec.layers))
    return cache_root() / "activations" / f"{fingerprint.weights_hash[:12]}-{spec.mode}-L{layers}-{digest.hexdigest()[:16]}"


def _save(directory: Path, result: Activations, spec: CollectSpec) -> None:
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        count = result.features.shape[0]
        for shard, start in enumerate(range(0, count, SHARD_EXCHANGES)):
            stop = min(start + SHARD_EXCHANGES, count)
            save_file({"features": result.features[start:stop].contiguous(),
                       "mask": result.mask[start:stop].contiguous(), "labels": result.labels[start:stop].contiguous()},
                      str(tmp / f"shard_{shard:04d}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps({"spec": asdict(spec), "exchanges": count}) + "\n")
        os.replace(tmp, directory)
    except OSError:
        pass  # a cache that cannot be written only costs time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _load(directory: Path, exchanges: list[Exchange], spec: CollectSpec) -> Activations:
    shards = [load_file(str(path)) for path in sorted(directory.glob("shard_*.safetensors"))]
    return Activations(torch.cat([s["features"] for s in shards]), torch.cat([s["mask"] for s in shards]),
                       torch.cat([s["labels"] for s in shards]), [e.prompt for e in exchanges], spec.layers)
