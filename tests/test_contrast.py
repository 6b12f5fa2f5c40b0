"""Contrast prompts for training, and the over-blocking dev set that must stay unseen."""

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from oc_engine.training.contrast import WRITTEN, keyword_mined, written_rows
from oc_engine.training.onpolicy import PromptRow
from oc_engine.training.splits import prompt_key

DEV = Path(__file__).resolve().parents[1] / "bench" / "data" / "overblocking_dev.jsonl"


def _dev_keys() -> set[str]:
    rows = [json.loads(line) for line in DEV.read_text().splitlines() if line.strip()]
    assert rows and all(r["prompt_label"] == "benign" for r in rows)
    return {prompt_key(r["prompt"]) for r in rows}


def test_the_overblocking_dev_set_is_never_a_training_prompt():
    dev = _dev_keys()
    assert not dev & {prompt_key(r.prompt) for r in written_rows()}
    if (SHARED_DATA / "train").is_dir():  # the pool the contrast prompts are mined from
        from oc_engine.training.onpolicy import read_labelled_prompts

        pool = read_labelled_prompts(SHARED_DATA / "train" / "alpaca_harmful_splits.jsonl")
        assert not dev & {prompt_key(r.prompt) for r in pool}


def test_written_contrast_prompts_are_benign_and_distinct():
    rows = written_rows()
    assert len(rows) == sum(len(v) for v in WRITTEN.values()) and len(WRITTEN) >= 8
    assert len({prompt_key(r.prompt) for r in rows}) == len(rows)
    assert {r.prompt_label for r in rows} == {"benign"}


@pytest.mark.parametrize("prompt,found", [("How do I kill a stuck process?", True),
                                          ("Explain what a DDoS attack is.", True),
                                          ("Write a haiku about spring.", False),
                                          ("What is skill-based matchmaking?", False)])
def test_keyword_mining_finds_words_of_harm_only(prompt, found):
    pool = [PromptRow(prompt, "benign", "alpaca")]
    assert bool(keyword_mined(pool, exclude=set())) == found
    assert keyword_mined(pool, exclude={prompt_key(prompt)}) == []
