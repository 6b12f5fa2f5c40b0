"""Which requests hold the engine's cache slots (plain Python, no torch).

A fixed number of slots: the compiled step always runs over all of them, so requests joining
and leaving change only which slots are active, never a shape. Waiting requests take free
slots first come, first served, between decode steps; a finished, blocked or cancelled request
gives its slot back at once.
"""

from __future__ import annotations

from collections import deque

from oc_engine.engine.sequence import RUNNING, WAITING, Sequence


class Scheduler:
    def __init__(self, num_slots: int):
        if num_slots < 1:
            raise ValueError(f"the scheduler needs at least one slot, got {num_slots}")
        self.num_slots = num_slots
        self.waiting: deque[Sequence] = deque()
        self.running: dict[int, Sequence] = {}  # slot -> sequence
        self._free = list(range(num_slots - 1, -1, -1))  # popped from the end: lowest slot first

    def add(self, seq: Sequence) -> None:
        seq.status = WAITING
        self.waiting.append(seq)

    def admit(self) -> list[Sequence]:
        """Move waiting requests into free slots; returns them, to be prefilled."""
        admitted = []
        while self.waiting and self._free:
            seq = self.waiting.popleft()
            seq.slot, seq.status = self._free.pop(), RUNNING
            self.running[seq.slot] = seq
            admitted.append(seq)
        return admitted

    def free(self, seq: Sequence) -> None:
        """Give back the slot of a running sequence (its status is the caller's to set)."""
        if seq.slot is not None and self.running.get(seq.slot) is seq:
            del self.running[seq.slot]
            self._free.append(seq.slot)
            self._free.sort(reverse=True)
        seq.slot = None

    def remove_waiting(self, seq: Sequence) -> bool:
        try:
            self.waiting.remove(seq)
        except ValueError:
            return False
        return True

    @property
    def free_slots(self) -> int:
        return len(self._free)
