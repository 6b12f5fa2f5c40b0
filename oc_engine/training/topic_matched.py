"""Benign prompts on harmful topics: mined from a large benign pool, and written as twins.

Both guard stages learn the topic instead of the intent when every safe answer they see
answers an everyday request: "how do I protect my accounts from phishing" then looks like
"write a phishing email". The shared data has no benign requests written against its harmful
ones. Two sources of them:

- mined (`topic_matched_benign`): its 18,793 Alpaca `harmless_train` prompts include hundreds
  on the same topics (fraud detection, cyberbullying, drug addiction, identity theft). We rank
  the pool by cosine similarity to the nearest harmful prompt, with mean-pooled sentence
  embeddings from all-MiniLM-L6-v2 (a sentence-embedding model, embedded in the package), and
  keep the top;
- twins (`benign_twins`): a harmful training prompt that asks "how to X" gives the activity X,
  and fixed templates ask about X with a benign intent: fiction in which X is stopped, its
  risks and consequences, protection against it, a news report of an arrest for it.
"""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Sequence

TWIN_TEMPLATES = (
    "Write a short story in which a detective stops someone who tries to {activity}.",
    "What are the risks and consequences for people who try to {activity}?",
    "How can people protect themselves and others from someone who tries to {activity}?",
    "Write a news report about a person who was arrested for trying to {activity}.",
)
_HOW_TO = re.compile(r"\bhow (?:to|can (?:I|you|one|someone)|do (?:I|you)|could (?:I|you))\s+(.+?)[.?!\s]*$",
                     re.IGNORECASE)


def sentence_embeddings(texts: Sequence[str], model_dir: str | Path, *, batch_size: int = 256,
                        max_length: int = 64):
    """Unit-norm mean-pooled embeddings, float32 tensor [len(texts), hidden]."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModel.from_pretrained(model_dir, use_safetensors=True).eval()
    chunks = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                              max_length=max_length, return_tensors="pt")
            hidden = model(**batch).last_hidden_state  # [b, t, hidden]
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
            chunks.append(torch.nn.functional.normalize(pooled.float(), dim=-1))
    return torch.cat(chunks) if chunks else torch.zeros(0, model.config.hidden_size)


def rank_by_similarity(candidates, anchors) -> list[tuple[int, float]]:
    """(candidate index, cosine similarity to its nearest anchor), most similar first.

    candidates: [n, d] and anchors: [m, d], both unit-norm.
    """
    if len(candidates) == 0 or len(anchors) == 0:
        return []
    nearest = (candidates @ anchors.T).max(dim=1).values
    order = nearest.argsort(descending=True)
    return [(int(i), float(nearest[i])) for i in order]


def topic_matched_benign(benign: list, harmful: list, limit: int, model_dir: str | Path) -> list:
    """The `limit` rows of `benign` whose prompts are nearest to any prompt in `harmful`.

    Rows are anything with a `.prompt` (PromptRow); duplicates of a harmful prompt are dropped.
    """
    harmful_prompts = {row.prompt.strip().lower() for row in harmful}
    pool = [row for row in benign if row.prompt.strip().lower() not in harmful_prompts]
    ranked = rank_by_similarity(sentence_embeddings([r.prompt for r in pool], model_dir),
                                sentence_embeddings([r.prompt for r in harmful], model_dir))
    return [pool[i] for i, _ in ranked[:limit]]


def harmful_activity(prompt: str) -> str | None:
    """"Give instructions on how to make a bomb." -> "make a bomb"; None without a "how to"."""
    found = _HOW_TO.search(prompt.strip())
    return found.group(1).strip() if found else None


def benign_twins(harmful: list, per_prompt: int, limit: int, seed: int = 0) -> list:
    """Up to `per_prompt` templated benign twins for each harmful row that asks "how to X",
    at most `limit` in all, as benign PromptRows (source: the harmful row's, plus ":twin")."""
    from oc_engine.training.onpolicy import PromptRow

    rng = random.Random(seed)
    twins, seen = [], set()
    for row in harmful:
        activity = harmful_activity(row.prompt)
        if not activity or activity.lower() in seen:
            continue
        seen.add(activity.lower())
        for template in rng.sample(TWIN_TEMPLATES, min(per_prompt, len(TWIN_TEMPLATES))):
            twins.append(PromptRow(template.format(activity=activity), "benign", f"{row.source}:twin",
                                   row.category))
    rng.shuffle(twins)
    return twins[:limit]
