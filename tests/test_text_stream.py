"""Stop strings: released text is always a prefix of the final text, which ends before the first stop."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from oc_engine.engine.text_stream import TextStream


class CharTokenizer:
    """One token per character; id 0 is a special token that decodes to nothing."""

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids if i != 0)


def _run(text: str, stops: tuple[str, ...]) -> tuple[list[str], TextStream]:
    stream = TextStream(CharTokenizer(), stops)
    pieces = []
    for ch in text:
        pieces.append(stream.push(ord(ch)))
        if stream.stopped:
            break
    pieces.append(stream.finish())
    return pieces, stream


def _expected(text: str, stops: tuple[str, ...]) -> str:
    """Generation stops when a stop string completes; the text ends where the earliest
    stop string seen by then begins."""
    for end in range(1, len(text) + 1):
        prefix = text[:end]
        hits = [prefix.find(s) for s in stops if s in prefix]
        if hits:
            return prefix[:min(hits)]
    return text


@settings(max_examples=300, deadline=None)
@given(text=st.text(alphabet="abc \n", max_size=40),
       stops=st.lists(st.text(alphabet="abc \n", min_size=1, max_size=4), max_size=3).map(tuple))
def test_released_text_ends_before_the_first_completed_stop(text, stops):
    pieces, stream = _run(text, stops)
    released = "".join(pieces)
    assert released == _expected(text, stops)
    assert not any(s in released for s in stops)
    assert stream.stopped == any(s in text for s in stops)


def test_text_that_may_start_a_stop_string_is_held_back():
    stream = TextStream(CharTokenizer(), ("</s>",))
    assert stream.push(ord("a")) == "a"
    assert stream.push(ord("<")) == ""
    assert stream.push(ord("/")) == ""
    assert stream.push(ord("x")) == "</x"  # not a stop after all: released at once
    for ch in "</s>tail":
        stream.push(ord(ch))
    assert stream.stopped and stream.released == "a</x"


def test_special_tokens_are_not_text():
    stream = TextStream(CharTokenizer())
    assert stream.push(ord("h")) + stream.push(0) + stream.push(ord("i")) + stream.finish() == "hi"


# -- the embedded model's tokenizer: pieces join to its decode, at a bounded cost per token --
@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from oc_engine.models.loading import resolve_model_source

    return AutoTokenizer.from_pretrained(resolve_model_source(None))


WORDS = ["Hello", " world", ",", " naïve", " café", " 東京", " 🙂", "\n", " </s>", " the", " stop"]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_pieces_join_to_the_tokenizers_decode(tokenizer, data):
    """Any ids, including byte tokens that split a character and special tokens."""
    text_ids = tokenizer("".join(data.draw(st.lists(st.sampled_from(WORDS), max_size=12))))["input_ids"]
    ids = data.draw(st.lists(st.one_of(st.sampled_from(text_ids or [0]), st.integers(0, len(tokenizer) - 1)),
                             max_size=24))
    stream = TextStream(tokenizer)
    released = "".join(stream.push(i) for i in ids) + stream.finish()
    assert released == tokenizer.decode(ids, skip_special_tokens=True) == stream.text


def test_the_text_of_a_prefix_is_its_decode(tokenizer):
    ids = tokenizer("Once upon a time, a café in 東京 served 🙂 tea.")["input_ids"]
    stream = TextStream(tokenizer)
    for i in ids:
        stream.push(i)
    stream.finish()
    for n in range(len(ids) + 1):
        decoded = tokenizer.decode(ids[:n], skip_special_tokens=True)
        if decoded.endswith("\ufffd"):  # a split character (and its token's space) comes with its last byte
            assert decoded.startswith(stream.text_upto(n))
        else:
            assert stream.text_upto(n) == decoded


class CountingTokenizer:
    """The embedded tokenizer, counting the ids each `decode` is given."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decoded = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


def test_each_token_costs_the_same_however_long_the_answer(tokenizer):
    """Decoding and stop matching look at a window, never the whole answer: the ids decoded
    per token stay bounded, and the stop strings are searched only near the end."""
    ids = tokenizer(" ".join(["the café sells tea and 🙂"] * 700))["input_ids"]
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting, ("never appears " * 18, "zzz", "tea and 🙂 tea and 🙂 x"))
    per_token = []
    for i in ids:
        before = counting.decoded
        stream.push(i)
        per_token.append(counting.decoded - before)
    assert len(ids) > 3000 and max(per_token) <= 8
    assert stream.released_chars > len(stream.text) - len("tea and 🙂 tea and 🙂 x") and not stream.stopped
