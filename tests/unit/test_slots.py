"""Target slots against a plain model: a set of taken slots."""

from __future__ import annotations

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from sklookupctl.slots import Slots, capacity_for


class SlotsMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.capacity = 40
        self.slots = Slots(self.capacity)
        self.model: dict[int, int] = {}  # first slot -> count

    def taken(self) -> set[int]:
        return {s for f, c in self.model.items() for s in range(f, f + c)}

    @rule(count=st.integers(1, 6))
    def acquire(self, count: int) -> None:
        got = self.slots.acquire(count)
        free = [
            f
            for f in range(self.capacity - count + 1)
            if not set(range(f, f + count)) & self.taken()
        ]
        if got is None:
            assert not free  # none left: no free run of `count` slots anywhere
            return
        assert got == free[0]  # first fit
        self.model[got] = count

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        first = data.draw(st.sampled_from(sorted(self.model)))
        self.slots.release(first, self.model.pop(first))

    @rule(first=st.integers(0, 45), count=st.integers(1, 4))
    def take(self, first: int, count: int) -> None:
        wanted = set(range(first, first + count))
        ok = first + count <= self.capacity and not wanted & self.taken()
        if ok:
            self.slots.take(first, count)
            self.model[first] = count
        else:
            with pytest.raises(ValueError):
                self.slots.take(first, count)

    @invariant()
    def agrees(self) -> None:
        assert self.slots.blocks() == sorted(self.model.items())
        assert len(self.slots) == len(self.taken())
        for s in range(self.capacity + 2):
            assert self.slots.has(s) == (s in self.taken())


TestSlots = SlotsMachine.TestCase
TestSlots.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_release_of_what_was_not_taken_is_an_error() -> None:
    s = Slots(8, [(2, 2)])
    with pytest.raises(ValueError):
        s.release(2, 1)
    with pytest.raises(ValueError):
        s.release(5, 1)


def test_capacity_is_a_power_of_two_at_least_twice_the_need() -> None:
    assert capacity_for(0) == 64 and capacity_for(600) == 2048
    assert capacity_for(10_000) == 32768 and capacity_for(3, minimum=4) == 8
    for need in range(0, 5000, 37):
        c = capacity_for(need, minimum=1)
        assert c >= 2 * need and c & (c - 1) == 0 and (c // 2 < 2 * need or c == 1)


def test_thousands_of_blocks_one_by_one() -> None:
    s = Slots(1 << 16)
    for i in range(20_000):
        assert s.acquire(1 + i % 3) is not None
    assert len(s) == sum(1 + i % 3 for i in range(20_000))
