"""Exhaustive tests of the anti-replay window (transport/replay.py)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transport.constants import REPLAY_WINDOW_SIZE
from transport.replay import MAX_COUNTER, ReplayWindow, ReplayWindowError


def accept_all(window: ReplayWindow, counters: list[int]) -> list[bool]:
    return [window.update(c) for c in counters]


def test_default_width_is_the_constant() -> None:
    assert ReplayWindow().size == REPLAY_WINDOW_SIZE


@pytest.mark.parametrize("size", [0, -1])
def test_impossible_width_refused(size: int) -> None:
    with pytest.raises(ReplayWindowError):
        ReplayWindow(size)


def test_empty_window_accepts_counter_zero() -> None:
    w = ReplayWindow(8)
    assert w.highest is None
    assert w.check(0)
    assert w.update(0)
    assert w.highest == 0
    assert not w.check(0)
    assert not w.update(0)


def test_in_order_sequence() -> None:
    w = ReplayWindow(8)
    assert accept_all(w, list(range(100))) == [True] * 100
    assert w.highest == 99


def test_duplicates_rejected_everywhere_in_window() -> None:
    w = ReplayWindow(8)
    accept_all(w, list(range(20)))
    for c in range(12, 20):  # the 8 counters still inside the window
        assert not w.check(c)
        assert not w.update(c)


def test_out_of_order_within_window() -> None:
    w = ReplayWindow(8)
    assert w.update(10)
    # every counter from 10-7 to 9 is still acceptable, once, in any order
    for c in (5, 3, 9, 4, 8, 7, 6):
        assert w.check(c)
        assert w.update(c)
        assert not w.update(c)
    assert w.highest == 10


def test_window_edge_exactly() -> None:
    w = ReplayWindow(8)
    assert w.update(100)
    assert w.check(93)  # offset 7: last slot inside a width-8 window
    assert not w.check(92)  # offset 8: too old
    assert not w.update(92)
    assert w.update(93)


def test_too_old_after_advance() -> None:
    w = ReplayWindow(8)
    assert w.update(0)
    assert w.update(1)
    assert w.update(9)  # 1 is now at offset 8
    assert not w.check(1)
    assert not w.check(0)
    assert w.check(2)


def test_big_jump_forgets_everything_older() -> None:
    w = ReplayWindow(8)
    accept_all(w, [0, 1, 2])
    assert w.update(1_000_000)
    assert w.highest == 1_000_000
    assert not w.check(2)
    assert w.check(999_993)
    assert not w.check(999_992)
    # a jump of exactly the width keeps only the new top
    assert w.update(1_000_008)
    assert not w.check(1_000_000)
    assert w.check(1_000_001)


def test_jump_of_width_minus_one_keeps_old_top_marked() -> None:
    w = ReplayWindow(8)
    assert w.update(50)
    assert w.update(57)  # 50 is at offset 7, still inside and still marked
    assert not w.check(50)
    assert w.check(51)


def test_check_does_not_mutate() -> None:
    w = ReplayWindow(8)
    for c in (0, 5, 3, MAX_COUNTER):
        assert w.check(c)
    assert w.highest is None
    assert w.update(3)
    assert w.check(5)
    assert w.check(0)
    assert w.highest == 3


def test_max_counter_is_accepted_once_and_nothing_beyond() -> None:
    w = ReplayWindow(8)
    assert w.update(MAX_COUNTER)
    assert not w.update(MAX_COUNTER)
    assert w.update(MAX_COUNTER - 7)
    assert not w.check(MAX_COUNTER - 8)


@pytest.mark.parametrize("bad", [-1, -(1 << 70), MAX_COUNTER + 1, 1 << 80])
def test_counters_outside_64_bits_rejected(bad: int) -> None:
    w = ReplayWindow(8)
    assert not w.check(bad)
    assert not w.update(bad)
    assert w.highest is None
    w.update(5)
    assert not w.check(bad)
    assert not w.update(bad)
    assert w.highest == 5


def test_full_width_window_each_slot_once() -> None:
    w = ReplayWindow()
    top = 10 * REPLAY_WINDOW_SIZE
    assert w.update(top)
    below = list(range(top - REPLAY_WINDOW_SIZE + 1, top))
    assert accept_all(w, below[::-1]) == [True] * len(below)
    assert accept_all(w, below) == [False] * len(below)
    assert not w.check(top - REPLAY_WINDOW_SIZE)


class ModelWindow:
    """The specification, written the obvious way: a set of every counter seen."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.seen: set[int] = set()
        self.highest = -1

    def update(self, counter: int) -> bool:
        if counter in self.seen or counter <= self.highest - self.size or not 0 <= counter <= MAX_COUNTER:
            return False
        self.seen.add(counter)
        self.highest = max(self.highest, counter)
        return True


@settings(derandomize=True, max_examples=300)
@given(
    size=st.integers(min_value=1, max_value=70),
    counters=st.lists(
        st.one_of(st.integers(min_value=0, max_value=200), st.integers(min_value=-2, max_value=MAX_COUNTER + 2)),
        max_size=300,
    ),
)
def test_matches_set_model(size: int, counters: list[int]) -> None:
    w = ReplayWindow(size)
    model = ModelWindow(size)
    for c in counters:
        expected = model.update(c)
        assert w.check(c) == expected
        assert w.update(c) == expected
