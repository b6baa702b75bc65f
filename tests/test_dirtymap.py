"""DirtyMap: merging, coarsening within a budget, and popping from a cursor.

The model is a bytearray with one flag per byte of a small disk: every byte ever added and not
popped since must stay covered by the map, whatever coarsening did.
"""

from __future__ import annotations

from typing import List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nbd_plugin.dirtymap import DirtyMap

DISK = 512


def covered(m: DirtyMap) -> Set[int]:
    return {b for s, e in m for b in range(s, e)}


def check_shape(m: DirtyMap) -> None:
    """Sorted, disjoint, non-adjacent, non-empty ranges; bytes and len agree with them."""
    ranges = list(m)
    for s, e in ranges:
        assert s < e
    for (_, e1), (s2, _) in zip(ranges, ranges[1:]):
        assert e1 < s2, "ranges %r are not disjoint and apart" % ranges
    assert m.bytes == sum(e - s for s, e in ranges)
    assert len(m) == len(ranges)
    assert bool(m) == bool(ranges)
    assert m.ranges() == [(s, e - s) for s, e in ranges]


def filled(*ranges: Tuple[int, int], max_ranges: int = 100) -> DirtyMap:
    m = DirtyMap(max_ranges=max_ranges)
    for offset, length in ranges:
        m.add(offset, length)
    return m


# -- add --------------------------------------------------------------------------------------

def test_new_map_is_empty() -> None:
    m = DirtyMap()
    assert len(m) == 0
    assert not m
    assert m.bytes == 0
    assert m.ranges() == []
    assert m.pop(100) is None


def test_max_ranges_below_two_is_refused() -> None:
    with pytest.raises(ValueError):
        DirtyMap(max_ranges=1)


def test_add_of_nothing_is_ignored() -> None:
    m = filled((10, 0), (20, -5))
    assert m.ranges() == []
    assert m.bytes == 0


def test_separate_ranges_stay_separate_and_sorted() -> None:
    m = filled((100, 10), (0, 5), (50, 1))
    assert m.ranges() == [(0, 5), (50, 1), (100, 10)]
    assert m.bytes == 16


def test_adjacent_ranges_merge() -> None:
    m = filled((0, 10), (10, 5))
    assert m.ranges() == [(0, 15)]
    m.add(20, 5)
    m.add(15, 5)
    assert m.ranges() == [(0, 25)]
    assert m.bytes == 25


def test_overlapping_ranges_merge_and_count_bytes_once() -> None:
    m = filled((10, 10), (15, 10))
    assert m.ranges() == [(10, 15)]
    assert m.bytes == 15


def test_add_spanning_several_ranges_swallows_them() -> None:
    m = filled((10, 2), (20, 2), (30, 2), (100, 1))
    m.add(5, 30)
    assert m.ranges() == [(5, 30), (100, 1)]
    assert m.bytes == 31


def test_add_inside_a_range_changes_nothing() -> None:
    m = filled((0, 100))
    m.add(10, 5)
    assert m.ranges() == [(0, 100)]
    assert m.bytes == 100


def test_coarsening_merges_the_smallest_gaps_first() -> None:
    # Blocks 2, 5, 9 with a budget of 2: down to 3/4 of the budget (one range), 2-9.
    m = filled((2, 1), (5, 1), (9, 1), max_ranges=2)
    assert m.ranges() == [(2, 8)]
    assert m.bytes == 8
    assert m.coarsened_bytes == 5


def test_coarsening_keeps_the_widest_gaps() -> None:
    m = filled((0, 1), (10, 1), (12, 1), (100, 1), (103, 1), max_ranges=4)
    # 5 ranges > 4: down to 3. Gaps are 9, 1, 87, 2: the two smallest (1 and 2) go.
    assert m.ranges() == [(0, 1), (10, 3), (100, 4)]
    assert m.coarsened_bytes == 3
    assert m.bytes == 8


def test_clear_forgets_everything_and_resets_the_cursor() -> None:
    m = filled((0, 10), (50, 10))
    assert m.pop(5) == (0, 5)
    m.clear()
    assert m.ranges() == [] and m.bytes == 0
    m.add(0, 10)
    m.add(50, 10)
    assert m.pop(100) == (0, 10)


def test_iteration_is_a_snapshot() -> None:
    m = filled((0, 10), (50, 10))
    seen = []
    for s, e in m:
        seen.append((s, e))
        m.add(e + 100, 1)
    assert seen == [(0, 10), (50, 60)]


# -- pop and the cursor ----------------------------------------------------------------------

def test_pop_takes_up_to_max_length_from_the_first_range() -> None:
    m = filled((10, 100))
    assert m.pop(30) == (10, 30)
    assert m.ranges() == [(40, 70)]
    assert m.bytes == 70


def test_pop_resumes_after_where_it_stopped() -> None:
    m = filled((0, 10), (20, 10), (40, 10))
    assert m.pop(10) == (0, 10)
    m.add(0, 5)  # behind the cursor: comes after a wrap
    assert m.pop(10) == (20, 10)
    assert m.pop(10) == (40, 10)
    assert m.pop(10) == (0, 5)
    assert m.pop(10) is None


def test_pop_wraps_round_to_the_start() -> None:
    m = filled((0, 10), (100, 10))
    assert m.pop(100) == (0, 10)
    assert m.pop(100) == (100, 10)
    m.add(0, 3)
    m.add(50, 3)
    assert m.pop(100) == (0, 3)
    assert m.pop(100) == (50, 3)


def test_pop_with_the_cursor_inside_a_range_splits_it() -> None:
    m = filled((0, 100))
    assert m.pop(10) == (0, 10)
    m.add(0, 10)  # the range is whole again, the cursor is at 10, inside it
    assert m.ranges() == [(0, 100)]
    assert m.pop(20) == (10, 20)
    assert m.ranges() == [(0, 10), (30, 70)]
    assert m.pop(70) == (30, 70)
    assert m.pop(70) == (0, 10)
    assert not m


def test_pop_with_the_cursor_inside_a_range_to_its_end() -> None:
    m = filled((0, 100))
    assert m.pop(40) == (0, 40)
    m.add(0, 40)
    assert m.pop(1000) == (40, 60)
    assert m.ranges() == [(0, 40)]
    assert m.bytes == 40


def test_pop_never_splits_a_range_past_the_budget() -> None:
    m = filled((0, 100), (200, 1), max_ranges=2)
    assert m.pop(10) == (0, 10)
    m.add(0, 10)  # the cursor (10) is inside [0, 100) and the map is at its budget
    assert m.pop(20) == (0, 20)  # splitting would make three ranges: the head goes instead
    assert m.ranges() == [(20, 80), (200, 1)]
    assert m.pop(100) == (20, 80)
    assert m.pop(100) == (200, 1)
    assert not m


def test_pop_at_a_range_end_goes_to_the_next_range() -> None:
    m = filled((0, 10), (20, 10))
    assert m.pop(10) == (0, 10)  # cursor 10 == the end of the old first range
    m.add(5, 5)
    assert m.pop(100) == (20, 10)
    assert m.pop(100) == (5, 5)


# -- properties --------------------------------------------------------------------------------

ranges_st = st.lists(
    st.tuples(st.integers(0, DISK - 1), st.integers(0, 40)), max_size=60)


@pytest.mark.parametrize("max_ranges", [2, 3, 8, 1000])
@settings(deadline=None, max_examples=100)
@given(ranges=ranges_st)
def test_adds_never_lose_a_byte_and_respect_the_budget(
        max_ranges: int, ranges: List[Tuple[int, int]]) -> None:
    m = DirtyMap(max_ranges=max_ranges)
    added: Set[int] = set()
    for offset, length in ranges:
        m.add(offset, length)
        added.update(range(offset, offset + max(length, 0)))
        check_shape(m)
        assert len(m) <= max_ranges
        cov = covered(m)
        assert added <= cov
        assert m.coarsened_bytes >= len(cov) - len(added)
        if max_ranges >= len(ranges):
            assert cov == added  # never over budget: the map is exact


class DirtyMapMachine(RuleBasedStateMachine):
    """Adds and pops against a per-byte model, including the cursor's position."""

    @initialize(max_ranges=st.integers(2, 6))
    def setup(self, max_ranges: int) -> None:
        self.m = DirtyMap(max_ranges=max_ranges)
        self.owed = bytearray(DISK)  # 1: added and not popped since
        self.cursor = 0

    @rule(offset=st.integers(0, DISK - 1), length=st.integers(1, 40))
    def add(self, offset: int, length: int) -> None:
        before = covered(self.m)
        self.m.add(offset, length)
        for b in range(offset, min(offset + length, DISK)):
            self.owed[b] = 1
        # Coarsening may add bytes; it never drops any.
        assert before <= covered(self.m)

    @rule(max_length=st.integers(1, 64))
    def pop(self, max_length: int) -> None:
        before = covered(self.m)
        expected = self.expected_pop(before, max_length)
        got = self.m.pop(max_length)
        assert got == expected
        if got is None:
            return
        offset, length = got
        piece = set(range(offset, offset + length))
        after = covered(self.m)
        assert piece <= before
        assert not piece & after, "a popped byte is still in the map"
        assert piece | after == before, "pop lost or invented bytes"
        for b in piece:
            if b < DISK:
                self.owed[b] = 0
        self.cursor = offset + length

    def expected_pop(self, cov: Set[int], max_length: int) -> Optional[Tuple[int, int]]:
        """The first dirty byte at or after the cursor (else the first one) and what follows
        it; but a pop never splits a range when the map is at its budget."""
        if not cov:
            return None
        ahead = [b for b in cov if b >= self.cursor]
        start = min(ahead) if ahead else min(cov)
        end = self.run_end(cov, start, max_length)
        if start - 1 in cov and end in cov and len(self.m) >= self.m.max_ranges:
            while start - 1 in cov:
                start -= 1
            end = self.run_end(cov, start, max_length)
        return start, end - start

    @staticmethod
    def run_end(cov: Set[int], start: int, max_length: int) -> int:
        end = start
        while end in cov and end - start < max_length:
            end += 1
        return end

    @rule()
    def clear(self) -> None:
        self.m.clear()
        self.owed = bytearray(DISK)
        self.cursor = 0

    @invariant()
    def shape(self) -> None:
        check_shape(self.m)
        assert len(self.m) <= self.m.max_ranges

    @invariant()
    def owed_bytes_are_covered(self) -> None:
        cov = covered(self.m)
        missing = [b for b in range(DISK) if self.owed[b] and b not in cov]
        assert not missing, "owed bytes %r fell out of the map" % missing[:10]


DirtyMapMachine.TestCase.settings = settings(
    deadline=None, max_examples=300, stateful_step_count=40)
test_dirtymap_machine = DirtyMapMachine.TestCase
