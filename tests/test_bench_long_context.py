"""The long-context dev set and its bench's arithmetic (the bench itself drives a real server)."""

import json
from pathlib import Path

from conftest import SHARED_DATA
from oc_engine.bench.long_context import contexts_of, long_context_markdown, read_requests, summarize
from oc_engine.training.contrast import written_rows
from oc_engine.training.splits import prompt_key

DATA = Path(__file__).resolve().parents[1] / "bench" / "data"


def test_the_dev_set_is_written_here_and_never_a_training_prompt():
    rows = read_requests(DATA / "long_context_dev.jsonl")
    keys = {prompt_key(r["prompt"]) for r in rows}
    assert len(keys) == len(rows) == 80
    assert sum(r["prompt_label"] == "harmful" for r in rows) == 40
    assert not keys & {prompt_key(r.prompt) for r in written_rows()}
    if (SHARED_DATA / "train").is_dir():
        for path in sorted((SHARED_DATA / "train").glob("*.jsonl")):
            seen = {prompt_key(json.loads(line)["prompt"]) for line in path.read_text().splitlines() if line.strip()}
            assert not keys & seen, path.name


def test_each_request_goes_bare_behind_each_system_prompt_and_into_a_chat():
    contexts = contexts_of(json.loads((DATA / "long_context_contexts.json").read_text()))
    assert list(contexts) == ["bare", "system:coding", "system:shop", "system:policy", "chat:shop"]
    assert contexts["bare"] == []
    chat = contexts["chat:shop"]
    assert chat[0]["role"] == "system" and [m["role"] for m in chat[1:]] == ["user", "assistant"] * 2


def test_the_summary_counts_stopped_refused_let_through_and_paused():
    rows = [{"prompt_label": "harmful", "category": "x"}] * 4 + \
        [{"prompt_label": "benign", "category": "sounds_dangerous"}] * 2 + [{"prompt_label": "benign"}] * 2

    def answer(finish, text="Sure, here it is.", pauses=0):
        return {"finish_reason": finish, "text": text,
                "oc_engine": {"pause_points": list(range(pauses)), "verdicts": [{}] * pauses}}

    answers = {("bare", 0): answer("content_filter", pauses=2), ("bare", 1): answer("stop", "I'm sorry, I can't."),
               ("bare", 2): answer("stop"), ("bare", 3): answer("length", pauses=1),
               ("bare", 4): answer("content_filter"), ("bare", 5): answer("stop"),
               ("bare", 6): answer("stop"), ("bare", 7): answer("stop", pauses=3)}
    got = summarize(rows, answers, "bare")
    assert (got["harmful_stopped"], got["harmful_refused_by_model"], got["harmful_let_through"]) == (0.25, 0.25, 0.5)
    assert (got["benign_blocked"], got["dangerous_benign_blocked"]) == (0.25, 0.5)
    assert (got["harmful_paused"], got["benign_paused"], got["checks"]) == (0.5, 0.25, 6)
    report = {"results": {"bare": {**got, "vs_bare_points": {"harmful_stopped": 0.0, "benign_blocked": 0.0}}},
              "targets": {"all_met": True}}
    assert "| bare | 25.0% | 25.0% | 50.0% | 25.0% |" in long_context_markdown(report)
