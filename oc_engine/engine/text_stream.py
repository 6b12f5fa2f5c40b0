"""Turn a growing list of token ids into released text, honouring stop strings.

Plain Python over a tokenizer's `decode`: text is released only once it can no longer be
the start of a stop string, and never while it ends in an incomplete UTF-8 character.
"""

from __future__ import annotations


class TextStream:
    def __init__(self, tokenizer, stop_strings: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop_strings = tuple(s for s in stop_strings if s)
        self.ids: list[int] = []
        self.released = ""
        self.stopped = False  # a stop string was found; text ends before it

    def push(self, token_id: int) -> str:
        """Add one token; return the text newly safe to release (maybe empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [at for at in (text.find(stop) for stop in self.stop_strings) if at != -1]
        if hits:  # cut at the earliest occurrence of any stop string
            text = text[:min(hits)]
            self.stopped = True
        if not self.stopped:
            if text.endswith("\ufffd"):  # a multi-byte character split across tokens
                return ""
            text = text[: len(text) - self._stop_prefix_len(text)]
        return self._release(text)

    def finish(self) -> str:
        """Release everything still held (the sequence is over)."""
        if self.stopped:
            return ""
        return self._release(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _release(self, text: str) -> str:
        if len(text) <= len(self.released):
            return ""
        new = text[len(self.released):]
        self.released = text
        return new

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for stop in self.stop_strings:
            for n in range(min(len(stop) - 1, len(text)), best, -1):
                if text.endswith(stop[:n]):
                    best = n
                    break
        return best
