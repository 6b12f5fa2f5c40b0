"""Stop strings: released text is always a prefix of the final text, which ends before the first stop."""

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
