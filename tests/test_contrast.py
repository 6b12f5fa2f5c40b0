"""Contrast prompts for training, and the over-blocking dev set that must stay unseen."""

import json
from pathlib import Path

import pytest

from conftest import SHARED_DATA
from oc_engine.training.contrast import WRITTEN, keyword_mined, written_rows
from oc_engine.training.onpolicy import PromptRow
from oc_engine.training.splits import prompt_key

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"
# Our dev sets, written apart and never trained on: (file, the prompt label of every row).
DEV_SETS = (("overblocking_dev.jsonl", "benign"), ("overblocking_hard_dev.jsonl", "benign"),
            ("plain_compliance_dev.jsonl", "harmful"), ("other_language_dev.jsonl", "harmful"),
            ("multi_turn_split_dev.jsonl", "harmful"))


def _dev_keys(name: str, label: str) -> set[str]:
    rows = [json.loads(line) for line in (DATA / name).read_text().splitlines() if line.strip()]
    assert rows and all(r["prompt_label"] == label for r in rows)
    keys = {prompt_key(r["prompt"]) for r in rows}
    assert len(keys) == len(rows), f"{name} repeats a prompt"
    return keys


@pytest.mark.parametrize("name,label", DEV_SETS)
def test_our_dev_sets_are_never_training_prompts(name, label):
    dev = _dev_keys(name, label)
    assert not dev & {prompt_key(r.prompt) for r in written_rows()}
    if (SHARED_DATA / "train").is_dir():  # every prompt the default builds may train on
        from oc_engine.training.onpolicy import read_labelled_prompts

        for file in sorted((SHARED_DATA / "train").glob("*.jsonl")):
            assert not dev & {prompt_key(r.prompt) for r in read_labelled_prompts(file)}, file.name


def test_the_dev_sets_are_as_large_as_the_issue_asks():
    """The harder over-blocking set at least as large as the first; 50 blunt harmful requests at least."""
    assert len(_dev_keys("overblocking_hard_dev.jsonl", "benign")) >= len(_dev_keys("overblocking_dev.jsonl", "benign"))
    assert len(_dev_keys("plain_compliance_dev.jsonl", "harmful")) >= 50


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
