"""The side channel from vLLM's worker to the caller: per-token probe scores in shared memory.

The caller (`backend`) creates one table, a file under /dev/shm mapped by both processes, and
gives each request a row for its lifetime plus a tag unique to that request. The request's
`SamplingParams.extra_args["oc_engine"]` names the file, the row and the tag; the logits
processor in the worker writes, for the token it is about to sample at index k:

    entries[row, k] = (tag, score, ema, flags)     float64; the tag is written last

before that token leaves the worker, so by the time the caller sees token k its entry is there.
The caller trusts an entry only when its tag is the request's own: a missing or stale entry
reads as a NaN score, which the guard treats as a pause (fail closed). The EMA lives here too
(the processor reads entry k-1's EMA), so it survives vLLM preempting and re-adding a request.

    control[row] = (tag, stop)                       int64; stop=1: the guard ended the answer

`stop` makes the processor force EOS at the next step: a hard stop inside the engine that does
not wait for the abort message to reach it.

Shapes: entries [rows, max_len, 4] float64, control [rows, 2] int64. One file, header first.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

MAGIC = 0x6F63_7376  # "ocsv"
HEADER = 4  # int64 words: magic, rows, max_len, reserved
TAG, SCORE, EMA, FLAGS = range(4)


class ScoreTable:
    def __init__(self, path: str | Path, rows: int, max_len: int, *, create: bool = False):
        self.path, self.rows, self.max_len = str(path), rows, max_len
        words = HEADER + rows * 2 + rows * max_len * 4
        mode = "w+" if create else "r+"
        self._map = np.memmap(self.path, dtype=np.int64, mode=mode, shape=(words,))
        if create:
            self._map[:HEADER] = (MAGIC, rows, max_len, 0)
        elif int(self._map[0]) != MAGIC or int(self._map[1]) != rows or int(self._map[2]) != max_len:
            raise ValueError(f"{self.path} is not an oc-engine score table of {rows} x {max_len}")
        self.control = self._map[HEADER:HEADER + rows * 2].reshape(rows, 2)
        self.entries = self._map[HEADER + rows * 2:].view(np.float64).reshape(rows, max_len, 4)

    @classmethod
    def create(cls, rows: int, max_len: int, directory: str | None = None) -> "ScoreTable":
        """A new zeroed table in /dev/shm (or `directory`); `close(unlink=True)` removes it."""
        directory = directory or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
        fd, path = tempfile.mkstemp(prefix="oc-engine-scores-", suffix=".bin", dir=directory)
        os.close(fd)
        return cls(path, rows, max_len, create=True)

    @classmethod
    def open(cls, path: str) -> "ScoreTable":
        """The worker's view of a table the caller created (its sizes read from the header)."""
        header = np.memmap(path, dtype=np.int64, mode="r", shape=(HEADER,))
        rows, max_len = int(header[1]), int(header[2])
        del header
        return cls(path, rows, max_len)

    # -- the caller's side --------------------------------------------------------------
    def claim(self, row: int, tag: int) -> None:
        """Give `row` to a new request: its old entries can no longer pass for the new one's."""
        self.control[row] = (tag, 0)
        self.entries[row, :, TAG] = 0.0

    def read(self, row: int, tag: int, index: int) -> tuple[float, float, int] | None:
        """(score, ema, flags) of token `index`, or None if the worker has not written it."""
        if not 0 <= index < self.max_len:
            return None
        entry = self.entries[row, index].copy()
        if entry[TAG] != float(tag):
            return None
        return float(entry[SCORE]), float(entry[EMA]), int(entry[FLAGS])

    def stop(self, row: int, tag: int) -> None:
        if int(self.control[row, 0]) == tag:
            self.control[row, 1] = 1

    # -- the worker's side --------------------------------------------------------------
    def previous_ema(self, row: int, tag: int, index: int) -> float:
        """The EMA before token `index`: -1 (no score yet) at 0, NaN if entry index-1 is not this
        request's (a hole: the processor then flags the token as non-finite)."""
        if index == 0:
            return -1.0
        if not 0 < index <= self.max_len or self.entries[row, index - 1, TAG] != float(tag):
            return float("nan")
        return float(self.entries[row, index - 1, EMA])

    def write(self, row: int, tag: int, index: int, score: float, ema: float, flags: int) -> None:
        if 0 <= index < self.max_len:
            entry = self.entries[row, index]
            entry[SCORE], entry[EMA], entry[FLAGS] = score, ema, flags
            entry[TAG] = tag  # last: an entry with the right tag is complete

    def stopped(self, row: int, tag: int) -> bool:
        return int(self.control[row, 0]) == tag and int(self.control[row, 1]) == 1

    def close(self, unlink: bool = False) -> None:
        self._map.flush()
        del self._map, self.control, self.entries
        if unlink:
            Path(self.path).unlink(missing_ok=True)
