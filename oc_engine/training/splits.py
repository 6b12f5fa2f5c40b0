"""Splits grouped by prompt, and response-prefix augmentation: plain Python, no torch.

At run time the classifier judges partial answers (the guard asks mid-answer), so training
shows it prefixes of each response too, and slices that start mid-answer: a long answer is
judged in windows (`exchange_layout`), and a later window starts inside the answer. A split puts every row of one prompt on one side, so
validation never sees a prompt that training saw (the same goal recurs under many attacks and
models; the prompt text is the grouping key the data gives us).
"""

from __future__ import annotations

import hashlib
import random
import re
from typing import Sequence, TypeVar

T = TypeVar("T")


def prompt_key(prompt: str) -> str:
    """Case- and whitespace-insensitive identity of a prompt."""
    return re.sub(r"\s+", " ", prompt.strip().lower())


def prompt_hash(prompt: str, seed: int = 0) -> int:
    """A 64-bit hash of `prompt_key(prompt)` under `seed`: where a prompt's rows go, stable across runs."""
    digest = hashlib.sha256(f"{seed}:{prompt_key(prompt)}".encode()).digest()
    return int.from_bytes(digest[:8], "big")


def grouped_split(rows: Sequence[T], prompt_of, validation: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """(train, validation): each prompt's rows on one side, about `validation` of the prompts held out."""
    if not 0 <= validation < 1:
        raise ValueError(f"validation share must be in [0, 1), got {validation}")
    train, held = [], []
    for row in rows:
        (held if prompt_hash(prompt_of(row), seed) / 2 ** 64 < validation else train).append(row)
    return train, held


def response_prefixes(response: str, count: int, rng: random.Random, min_fraction: float = 0.2) -> list[str]:
    """`count` random word-boundary prefixes of `response`, each at least `min_fraction` of its words."""
    words = response.split(" ")
    if len(words) < 4 or count < 1:
        return []
    low = max(1, int(len(words) * min_fraction))
    cuts = sorted({rng.randint(low, len(words) - 1) for _ in range(count)})
    return [" ".join(words[:cut]) for cut in cuts]


def response_slices(response: str, count: int, rng: random.Random, min_words: int = 12) -> list[str]:
    """`count` random word-boundary slices of `response` that start after its first fifth and
    end after their start plus a quarter of its words (a later window of a long answer)."""
    words = response.split(" ")
    if len(words) < min_words or count < 1:
        return []
    out = []
    for _ in range(count):
        start = rng.randint(max(1, len(words) // 5), len(words) // 2)
        end = rng.randint(min(len(words), start + len(words) // 4), len(words))
        out.append(" ".join(words[start:end]))
    return out
