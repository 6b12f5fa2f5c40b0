"""Exchanges put behind system prompts and chats for training and calibration (`training/contexts`)."""

import json
from pathlib import Path

from oc_engine.data import Exchange
from oc_engine.training.contexts import SYSTEM_PROMPTS, with_contexts

DEV_CONTEXTS = Path(__file__).resolve().parents[1] / "bench" / "data" / "long_context_contexts.json"


def _rows(n=400):
    return [Exchange(f"question number {i}", f"answer {i} " * 20, i % 3, "test") for i in range(n)]


def test_a_share_of_prompts_gets_a_context_the_same_each_time_and_the_rest_is_unchanged():
    rows = _rows()
    once, again = with_contexts(rows, 0.3), with_contexts(rows, 0.3)
    assert once == again
    behind = [e for e in once if e.context]
    assert 0.2 < len(behind) / len(rows) < 0.4
    for before, after in zip(rows, once):
        assert (after.prompt, after.response, after.label) == (before.prompt, before.response, before.label)
        assert not after.context or after.context[-1][0] in ("system", "assistant")
    assert with_contexts(rows, 0.0) == rows
    kinds = {e.context[0][0] for e in behind}
    assert kinds == {"system", "user"}  # system prompts, and chats without one
    for e in behind:  # an earlier turn is never the exchange's own prompt
        assert all(content != e.prompt for role, content in e.context if role == "user")


def test_every_row_of_one_prompt_gets_the_same_context():
    rows = [Exchange("the same prompt", f"answer {i}", i % 3) for i in range(10)] + _rows(50)
    contexts = {e.context for e in with_contexts(rows, 0.99) if e.prompt == "the same prompt"}
    assert len(contexts) == 1


def test_training_system_prompts_are_not_the_dev_sets():
    dev = json.loads(DEV_CONTEXTS.read_text())
    texts = list(dev["system_prompts"].values()) + [m["content"] for m in dev["history"]]
    for prompt in SYSTEM_PROMPTS:
        assert all(prompt not in text and text not in prompt for text in texts)


def test_an_exchange_behind_a_context_is_rendered_as_generation_renders_the_conversation():
    from tiny_models import tiny_tokenizer

    from oc_engine.engine.prompts import render_messages
    from oc_engine.training.activations import CollectSpec, exchange_ids

    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}w5 {{ m['content'] }} w6 {% endfor %}"
                               "{% if add_generation_prompt %}w7{% endif %}")
    # Words that do not begin with a special token's text (w0 to w3 are special in the tiny tokenizer).
    exchange = Exchange("w40 w41", "w50 w51 w52", 2, context=(("system", "w60 w61"), ("user", "w42"),
                                                              ("assistant", "w43")))
    ids, prompt_len = exchange_ids(tokenizer, exchange, CollectSpec(layers=(1,)))
    assert ids[:prompt_len] == render_messages(tokenizer, exchange.messages())
    assert tokenizer.decode(ids[prompt_len:]) == "w50 w51 w52"
    assert tokenizer.decode(ids[:prompt_len]).startswith("w5 w60 w61")


def test_a_share_of_requests_is_asked_after_benign_text_with_its_label_kept():
    from oc_engine.training.contexts import with_long_requests

    rows = _rows()
    longer = with_long_requests(rows, 0.25)
    assert longer == with_long_requests(rows, 0.25)
    changed = [(a, b) for a, b in zip(rows, longer) if a != b]
    assert 0.15 < len(changed) / len(rows) < 0.35
    for before, after in changed:
        assert after.prompt.endswith("\n\n" + before.prompt) and len(after.prompt) > len(before.prompt) + 20
        assert (after.response, after.label, after.context) == (before.response, before.label, ())
