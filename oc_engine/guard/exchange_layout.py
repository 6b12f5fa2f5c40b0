"""What one classifier check reads: an exchange laid out by token budget, never truncated.

The classifier is a small encoder with a fixed number of positions (512 for MiniLM). Tokenizing
`request + answer` and cutting from the right (`truncation=True`) dropped the answer as soon as
a long request filled the window, and never judged an answer past its first few hundred tokens.
Here each check's input is built from token ids, by budget:

- **A text pair** in the tokenizer's own layout (`[CLS] request [SEP] answer [SEP]` for BERT and
  ModernBERT). Each segment is tokenized with `split_special_tokens=True`, so text that reads
  `[SEP]`, `<s>` or `\\nAssistant:` is judged as text: only this module places separators.
- **The answer first.** An answer check covers the answer up to its pause point. The window ends
  there and reaches back as far as the budget allows; the request gets what is left, at least
  `REQUEST_SHARE` of the window when it is that long, and keeps its head and tail when it must be
  shortened (the ask is usually at one end). A long answer is judged in overlapping windows
  (`OVERLAP_SHARE` of the answer budget), from its end back to the part an earlier allowed check
  already judged (`judged_chars`), so no token is released that no window judged, and every
  token is judged with earlier answer text before it, as NeMo Guardrails' streaming rails do
  with a chunk and a context size.
- **The input check** (an empty answer) reads the request whole: in overlapping windows of the
  full budget when it is longer than one.

A check's verdict is the worst of its windows (the highest `p_unsafe`). The layout is a
function of the texts and the budget alone, never of timing.
"""

from __future__ import annotations

from dataclasses import dataclass

from oc_engine.errors import OcEngineError

INPUT_FORMAT = "text-pair"  # the only layout a classifier export may declare (classifier_config.json)
REQUEST_SHARE = 0.25  # the request's share of a window when the answer needs the rest
OVERLAP_SHARE = 0.25  # earlier answer text repeated at the start of the next window
ELISION = " ... "  # between the head and the tail of a shortened request


@dataclass(frozen=True)
class PairTemplate:
    """The special tokens around a text pair: prefix A middle B suffix, with segment ids."""

    prefix: tuple[int, ...]
    middle: tuple[int, ...]
    suffix: tuple[int, ...]
    type_a: int
    type_b: int
    has_types: bool

    @classmethod
    def of(cls, tokenizer) -> "PairTemplate":
        """Read the tokenizer's pair layout from one encoded pair of known one-token words."""
        a, b = _one_token_word(tokenizer, ("a", "the", "x")), _one_token_word(tokenizer, ("b", "of", "y"))
        encoded = tokenizer(a[0], b[0])
        ids = list(encoded["input_ids"])
        try:
            i = ids.index(a[1])
            j = ids.index(b[1], i + 1)
        except ValueError:
            raise OcEngineError("the classifier's tokenizer has no text-pair layout (it drops a segment)") from None
        types = encoded.get("token_type_ids")
        if not tokenizer.sep_token_id and not ids[i + 1:j]:
            raise OcEngineError("the classifier's tokenizer puts no separator between the request and the answer")
        return cls(prefix=tuple(ids[:i]), middle=tuple(ids[i + 1:j]), suffix=tuple(ids[j + 1:]),
                   type_a=int(types[i]) if types is not None else 0, type_b=int(types[j]) if types is not None else 0,
                   has_types=types is not None)

    @property
    def specials(self) -> int:
        return len(self.prefix) + len(self.middle) + len(self.suffix)

    def build(self, request: list[int], answer: list[int]) -> dict:
        """One model input (unpadded lists): input_ids, attention_mask, maybe token_type_ids."""
        ids = [*self.prefix, *request, *self.middle, *answer, *self.suffix]
        item = {"input_ids": ids, "attention_mask": [1] * len(ids)}
        if self.has_types:
            first = len(self.prefix) + len(request) + len(self.middle)
            item["token_type_ids"] = [self.type_a] * first + [self.type_b] * (len(ids) - first)
        return item


class ExchangeLayout:
    """Lays (request, answer) out as the classifier inputs of one check (see the module doc)."""

    def __init__(self, tokenizer, max_length: int):
        self.tokenizer = tokenizer
        self.template = PairTemplate.of(tokenizer)
        self.max_length = max_length
        self.body = max_length - self.template.specials  # tokens of text one window holds
        self.elision = self._ids(ELISION)
        if self.body < 16 + len(self.elision):
            raise OcEngineError(f"classifier max_length {max_length} leaves too little room for an exchange")
        self.request_floor = max(len(self.elision) + 2, int(self.body * REQUEST_SHARE))

    def windows(self, request: str, answer: str, judged_chars: int = 0) -> list[dict]:
        """The inputs of one check, in answer order: at least one, each at most `max_length`.

        judged_chars: the answer's first characters that an earlier allowed check already judged
        (windows reach back to them, with overlap, not to the answer's start)."""
        request_ids = self._ids(request)
        if not answer:
            return [self.template.build(part, []) for part in _tiles(request_ids, self.body,
                                                                     self._overlap(self.body), 0)]
        answer_ids, ends = self._ids(answer, offsets=True)
        room = self.body - len(answer_ids)
        if len(request_ids) <= room:  # the whole exchange fits one window
            return [self.template.build(request_ids, answer_ids)]
        request_part = self._head_and_tail(request_ids, max(self.request_floor, room))
        budget = self.body - len(request_part)
        judged = sum(1 for end in ends if end <= judged_chars) if judged_chars > 0 else 0
        return [self.template.build(request_part, part)
                for part in _tiles(answer_ids, budget, self._overlap(budget), judged)]

    def last_window(self, request: str, answer: str) -> dict:
        """The window that ends at the answer's last token: what a check at that point reads first
        (training rows and single-input tools use it)."""
        return self.windows(request, answer, judged_chars=len(answer))[-1]

    # -- internals ----------------------------------------------------------------------
    def _ids(self, text: str, offsets: bool = False):
        encoded = self.tokenizer(text, add_special_tokens=False, split_special_tokens=True,
                                 return_offsets_mapping=offsets, verbose=False)  # long is expected here
        ids = list(encoded["input_ids"])
        return (ids, [end for _, end in encoded["offset_mapping"]]) if offsets else ids

    def _head_and_tail(self, ids: list[int], budget: int) -> list[int]:
        if len(ids) <= budget:
            return ids
        keep = budget - len(self.elision)
        head = (keep + 1) // 2
        return ids[:head] + self.elision + ids[len(ids) - (keep - head):]

    @staticmethod
    def _overlap(budget: int) -> int:
        return max(1, int(budget * OVERLAP_SHARE))


def _tiles(ids: list[int], size: int, overlap: int, judged: int) -> list[list[int]]:
    """Overlapping windows of at most `size` ids, the last one ending at the end, reaching back
    until a window starts at or before `judged - overlap` (or at 0). In order of position."""
    if len(ids) <= size:
        return [ids]
    stop = max(0, judged - overlap)
    spans, end = [], len(ids)
    while True:
        start = max(0, end - size)
        spans.append((start, end))
        if start <= stop:
            break
        end = start + overlap
    return [ids[s:e] for s, e in reversed(spans)]


def _one_token_word(tokenizer, words) -> tuple[str, int]:
    for word in words:
        ids = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(ids) == 1:
            return word, ids[0]
    raise OcEngineError("the classifier's tokenizer splits every probe word; its pair layout cannot be read")
