"""Turn a growing list of token ids into released text, honouring stop strings.

Plain Python over a tokenizer's `decode`, at a cost per token that does not grow with the
answer: `IncrementalDecoder` decodes only a window of the last tokens (the method of vLLM's
detokenizer and Hugging Face's `DecodeStream`), and stop strings are looked for only where a
match could end in the new text. Text is released once it can no longer be the start of a
stop string, and never while it ends in an incomplete UTF-8 character.
"""

from __future__ import annotations


class IncrementalDecoder:
    """Token ids in, their text out piece by piece; the pieces join to `decode(ids)`.

    Each step decodes the tokens since the last piece with the one before them as context (a
    tokenizer may drop a word's leading space at the start of what it decodes), and holds a
    piece back while it ends in U+FFFD: a multi-byte character split across tokens."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # ids[_prefix:_read]: the context, already turned into text
        self._read = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        context, text = self._window()
        if len(text) <= len(context) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(context):]

    def finish(self) -> str:
        """What is still held back (an incomplete character, as U+FFFD)."""
        context, text = self._window()
        self._prefix = self._read = len(self.ids)
        return text[len(context):]

    def _window(self) -> tuple[str, str]:
        decode = self.tokenizer.decode
        window = self.ids[self._prefix:]
        return decode(window[:self._read - self._prefix], skip_special_tokens=True), \
            decode(window, skip_special_tokens=True)


class TextStream:
    """The answer's text (`text`, all of it, and `token_ends`: its length after each token) and
    what of it may be released (`push`, `finish`): up to the first stop string, less a tail
    that may still grow into one."""

    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.text = ""  # every token's text, stop strings not applied
        self.token_ends: list[int] = []
        self.released_chars = 0
        self.stopped = False  # a stop string was found; the released text ends before it

    @property
    def ids(self) -> list[int]:
        return self.decoder.ids

    @property
    def released(self) -> str:
        return self.text[:self.released_chars]

    def text_upto(self, tokens: int) -> str:
        """The text of the first `tokens` tokens (as far as it is decoded)."""
        return self.text[:self.token_ends[tokens - 1]] if tokens > 0 else ""

    def push(self, token_id: int) -> str:
        """Add one token; return the text newly safe to release (maybe empty)."""
        piece = self.decoder.push(token_id)
        new_from = len(self.text)
        self.text += piece
        self.token_ends.append(len(self.text))
        if self.stopped:
            return ""
        stop_at = self._first_stop(new_from)
        if stop_at is not None:
            self.stopped = True
            return self._release(stop_at)
        return self._release(self._stop_prefix_start())

    def finish(self) -> str:
        """Release everything still held (the sequence is over)."""
        new_from = len(self.text)
        self.text += self.decoder.finish()
        if self.token_ends:
            self.token_ends[-1] = len(self.text)
        if self.stopped:
            return ""
        stop_at = self._first_stop(new_from)
        self.stopped = stop_at is not None
        return self._release(len(self.text) if stop_at is None else stop_at)

    def _release(self, end: int) -> str:
        if end <= self.released_chars:
            return ""
        new, self.released_chars = self.text[self.released_chars:end], end
        return new

    def _first_stop(self, new_from: int) -> int | None:
        """Where the earliest stop string that ends after `new_from` begins, if one does (no
        match could end before: the earlier text was searched when it came)."""
        hits = [self.text.find(stop, max(self.released_chars, new_from - len(stop) + 1))
                for stop in self.stop_strings]
        hits = [at for at in hits if at != -1]
        return min(hits) if hits else None

    def _stop_prefix_start(self) -> int:
        """Where the text's longest tail that is a proper prefix of a stop string begins (the
        text's length if none): that tail is held back."""
        text, end = self.text, len(self.text)
        best = end
        for stop in self.stop_strings:
            at = text.find(stop[0], max(self.released_chars, end - len(stop) + 1))
            while at != -1 and at < best:
                if stop.startswith(text[at:]):
                    best = at
                    break
                at = text.find(stop[0], at + 1)
        return best
