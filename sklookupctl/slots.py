"""Target slots: which SOCKMAP slots are taken. Pure Python, no kernel.

A target owns a block of consecutive slots: one for a single socket, one per member for a
SO_REUSEPORT group (the program tries them in order). The only place slots are handed out and
given back; the plan (plan.py) decides when, the commit (store.py) fills and empties them.
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterable

# the SOCKMAP's size: at least this, and twice what the rule set needs (a whole set of targets
# can then move to new sockets in one change without growing); never more than the maximum
MIN_CAPACITY = 64
MAX_CAPACITY = 1 << 20


def capacity_for(slots_needed: int, minimum: int = MIN_CAPACITY) -> int:
    """The SOCKMAP size for a rule set needing `slots_needed` slots: a power of two, at least
    twice the need."""
    want = max(minimum, 2 * slots_needed, 1)
    return 1 << (want - 1).bit_length()


class Slots:
    """The blocks taken in a SOCKMAP of `capacity` slots. First fit."""

    def __init__(self, capacity: int, taken: Iterable[tuple[int, int]] = ()) -> None:
        self.capacity = capacity
        self._blocks: list[tuple[int, int]] = []  # (first, count), sorted, disjoint
        # the first `_packed` blocks cover slots 0.. with no gap: first fit starts after them
        # (acquiring thousands of blocks one by one stays linear)
        self._packed = 0
        for first, count in taken:
            self.take(first, count)

    def __len__(self) -> int:
        """Slots taken."""
        return sum(count for _, count in self._blocks)

    def blocks(self) -> list[tuple[int, int]]:
        return list(self._blocks)

    def has(self, slot: int) -> bool:
        """Whether `slot` belongs to a taken block."""
        i = bisect_left(self._blocks, (slot + 1, 0)) - 1
        return i >= 0 and self._blocks[i][0] <= slot < self._blocks[i][0] + self._blocks[i][1]

    def _free_at(self, first: int, count: int) -> bool:
        if first < 0 or count < 1 or first + count > self.capacity:
            return False
        i = bisect_left(self._blocks, (first, 0))
        if i > 0:
            f, c = self._blocks[i - 1]
            if f + c > first:
                return False
        return not (i < len(self._blocks) and self._blocks[i][0] < first + count)

    def take(self, first: int, count: int) -> None:
        """Mark a known block as taken (a live target's)."""
        if not self._free_at(first, count):
            raise ValueError(f"slots {first}..{first + count - 1} overlap a taken block")
        insort(self._blocks, (first, count))
        self._packed = min(self._packed, bisect_left(self._blocks, (first, count)))

    def acquire(self, count: int) -> int | None:
        """The first slot of a free block of `count` slots, now taken; None when none is left."""
        blocks = self._blocks
        k = self._packed
        at = blocks[k - 1][0] + blocks[k - 1][1] if k else 0
        while k < len(blocks) and blocks[k][0] == at:  # extend the packed run
            at = blocks[k][0] + blocks[k][1]
            k += 1
        self._packed = k
        i = k
        while i < len(blocks) and blocks[i][0] - at < count:
            at = blocks[i][0] + blocks[i][1]
            i += 1
        if at + count > self.capacity:
            return None
        blocks.insert(i, (at, count))
        return at

    def release(self, first: int, count: int) -> None:
        """Give a block back."""
        i = bisect_left(self._blocks, (first, count))
        if i >= len(self._blocks) or self._blocks[i] != (first, count):
            raise ValueError(f"slots {first}..{first + count - 1} are not a taken block")
        del self._blocks[i]
        self._packed = min(self._packed, i)
