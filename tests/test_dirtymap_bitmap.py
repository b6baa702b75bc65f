"""The dirty map past its list budget: a fixed-size bitmap of blocks. Against per-bit and
per-byte models: no owed byte ever falls out, nothing outside the owed blocks comes in,
``bytes`` and ``ranges`` agree, pops hand out what they remove."""

from __future__ import annotations

import random
import tracemalloc
from typing import List, Optional, Set, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from nbd_plugin.dirtymap import MAX_BLOCK, MIN_BLOCK, Bitmap, DirtyMap

KiB, MiB, GiB, TiB = 1024, 1024 ** 2, 1024 ** 3, 1024 ** 4


# -- the bitmap ------------------------------------------------------------------------------

@settings(deadline=None, max_examples=300)
@given(nbits=st.integers(1, 70),
       ops=st.lists(st.tuples(st.booleans(), st.integers(0, 75), st.integers(0, 75)),
                    max_size=30))
def test_bitmap_against_a_list_of_bits(nbits: int, ops: List[Tuple[bool, int, int]]) -> None:
    bm = Bitmap(nbits)
    model = [False] * nbits
    for on, b0, b1 in ops:
        before = sum(model)
        changed = bm.set(b0, b1) if on else bm.clear(b0, b1)
        for i in range(b0, min(b1, nbits)):
            model[i] = on
        assert changed == abs(sum(model) - before)
        assert bm.count == sum(model)
        assert all(bool(bm.bits[i >> 3] >> (i & 7) & 1) == model[i] for i in range(nbits))
        assert not any(bm.bits[i >> 3] >> (i & 7) & 1 for i in range(nbits, len(bm.bits) * 8))
        for start in range(nbits + 2):
            first_set = next((i for i in range(start, nbits) if model[i]), -1)
            first_clear = next((i for i in range(start, nbits) if not model[i]), nbits)
            assert bm.first_set(start) == first_set
            assert bm.first_clear(start) == first_clear


# -- choosing the block ------------------------------------------------------------------------

@pytest.mark.parametrize("size, budget, block", [
    (64 * GiB, 16 * MiB, 4 * KiB),       # 2 MiB of bits: exact to 4 KiB
    (64 * GiB + 1, 16 * MiB, 4 * KiB),   # still within half the budget
    (1 * TiB, 16 * MiB, 16 * KiB),       # 8 MiB of bits: half the budget
    (2 * TiB, 16 * MiB, 32 * KiB),
    (1 * GiB, 64 * KiB, 4 * KiB),
    (1 * GiB, 8 * KiB, 32 * KiB),
    (64 * TiB, 16 * MiB, 1 * MiB),
    (1000, 16 * MiB, 4 * KiB),
])
def test_the_block_is_the_finest_whose_bitmap_fits_half_the_budget(
        size: int, budget: int, block: int) -> None:
    m = DirtyMap.for_budget(budget, size)
    assert m.block == block
    assert -(-size // block) <= budget // 2 * 8
    assert block == MIN_BLOCK or -(-size // (block // 2)) > budget // 2 * 8
    assert m.max_ranges * 4 * 176 <= budget  # the list: a quarter of the budget


def test_a_disk_too_large_for_any_bitmap_keeps_merging_ranges() -> None:
    m = DirtyMap.for_budget(16 * MiB, 128 * TiB)  # 1 MiB blocks would take 16 MiB
    assert m.block == 0
    assert DirtyMap.for_budget(16 * MiB).block == 0  # no size: no bitmap either
    assert m.max_ranges == 16 * MiB // 176
    assert MAX_BLOCK == 1 * MiB


def test_a_bitmap_needs_a_size_and_a_power_of_two() -> None:
    with pytest.raises(ValueError, match="power-of-two"):
        DirtyMap(4, disk_size=None, block=4096)
    with pytest.raises(ValueError, match="power-of-two"):
        DirtyMap(4, disk_size=1 << 20, block=3000)


# -- behaviour ------------------------------------------------------------------------------

def bitmapped(size: int = 1 << 20, block: int = 4096, max_ranges: int = 2) -> DirtyMap:
    m = DirtyMap(max_ranges, disk_size=size, block=block)
    for i in range(max_ranges + 1):  # one range past the list's budget
        m.add(i * 4 * block, 1)
    assert m.granularity == block
    m.clear()
    return m


def test_the_map_turns_into_a_bitmap_past_its_list_budget() -> None:
    m = DirtyMap(max_ranges=3, disk_size=1 << 20, block=4096)
    for i in range(3):
        m.add(i * 65536 + 100, 10)
    assert m.granularity == 0 and m.bytes == 30 and m.coarsened_bytes == 0
    m.add(3 * 65536 + 100, 10)
    assert m.granularity == 4096
    assert m.ranges() == [(i * 65536, 4096) for i in range(4)]
    assert m.bytes == 4 * 4096
    assert m.coarsened_bytes == 4 * (4096 - 10)
    assert len(m) == 4  # dirty blocks


def test_the_short_last_block_counts_only_the_disk() -> None:
    m = bitmapped(size=10000, block=4096)
    m.add(9000, 5000)  # past the end: clipped
    assert m.ranges() == [(8192, 10000 - 8192)]
    assert m.bytes == 10000 - 8192
    m.add(0, 1)
    assert m.bytes == 4096 + 10000 - 8192
    assert m.pop(1 << 20) == (0, 4096)
    assert m.pop(1 << 20) == (8192, 10000 - 8192)
    assert m.pop(1 << 20) is None and not m


def test_pop_hands_out_runs_from_the_cursor_and_wraps() -> None:
    m = bitmapped()
    m.add(0, 4096)
    m.add(40960, 3 * 4096)
    m.add(81920, 100)
    assert m.pop(8192) == (0, 4096)
    assert m.pop(8192) == (40960, 8192)
    m.add(4096, 1)  # behind the cursor: waits for the wrap
    assert m.pop(8192) == (49152, 4096)
    assert m.pop(8192) == (81920, 4096)
    assert m.pop(8192) == (4096, 4096)
    assert m.pop(8192) is None


def test_pop_of_less_than_a_block_keeps_the_rest_exact() -> None:
    m = bitmapped(block=65536)
    m.add(65536, 1)
    assert m.pop(10000) == (65536, 10000)
    assert m.bytes == 65536 - 10000 and bool(m)
    assert m.intersects(65536 + 10000, 65536 + 10001)
    assert not m.intersects(65536, 65536 + 10000)
    assert m.ranges() == [(75536, 65536 - 10000)]
    copy = m.copy()
    assert m.pop(1 << 20) == (75536, 65536 - 10000)
    assert m.pop(1 << 20) is None
    assert copy.bytes == 65536 - 10000  # the copy kept its own rest


def test_intersects_looks_at_whole_blocks() -> None:
    m = bitmapped()
    m.add(8192 + 5, 1)
    assert m.intersects(8192, 8193)       # the same block
    assert m.intersects(0, 8193)
    assert not m.intersects(0, 8192)
    assert not m.intersects(12288, 1 << 20)
    assert not m.intersects(9000, 9000)   # empty


def test_copy_and_clear_are_independent() -> None:
    m = bitmapped()
    m.add(0, 3 * 4096)
    c = m.copy()
    m.clear()
    assert not m and m.granularity == 4096 and m.bytes == 0
    assert c.ranges() == [(0, 3 * 4096)]
    assert list(c) == [(0, 3 * 4096)]
    e = c.empty_copy()
    assert (e.max_ranges, e.disk_size, e.block, e.granularity, e.bytes) == (
        c.max_ranges, c.disk_size, c.block, 0, 0)


def test_random_4k_writes_over_a_large_disk_stay_exact_and_in_budget() -> None:
    """The long outage of the footprint benchmark: scattered 4 KiB writes over 64 GiB.
    The map stays in its budget and, once a bitmap, loses no detail at all."""
    budget = 4 * MiB
    size = 64 * GiB
    rng = random.Random(7)
    blocks = [rng.randrange(0, size // 4096) for _ in range(4 * budget // 4 // 176)]
    offsets = [b * 4096 for b in blocks]  # made before tracing: only the map is measured
    tracemalloc.start()
    try:
        m = DirtyMap.for_budget(budget, size)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for offset in offsets:
            m.add(offset, 4096)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    written = set(blocks)
    assert m.granularity == 4096
    assert peak - base <= budget and current - base <= budget // 2 + 64 * KiB
    assert m.bytes == len(written) * 4096
    assert m.coarsened_bytes == 0
    runs = m.ranges()
    assert sum(n for _, n in runs) == m.bytes
    assert {o // 4096 for o, n in runs if n == 4096} <= written


# -- against a model --------------------------------------------------------------------------

DISK = 301


class BitmapMapMachine(RuleBasedStateMachine):
    """Adds and pops on a map that becomes a bitmap, against the bytes owed: owed bytes
    are always covered; covered bytes are owed, or in a block an owed byte was rounded
    out to; pops give out covered bytes, at most ``max_length`` of them, and drop them."""

    @initialize(max_ranges=st.integers(2, 4), block=st.sampled_from([1, 2, 8, 16, 64]))
    def setup(self, max_ranges: int, block: int) -> None:
        self.m = DirtyMap(max_ranges, disk_size=DISK, block=block)
        self.owed = bytearray(DISK)   # added and not popped since
        self.rounded = bytearray(DISK)  # may be covered: the blocks of what was added

    def covered(self) -> Set[int]:
        return {b for o, n in self.m.ranges() for b in range(o, o + n)}

    @rule(offset=st.integers(0, DISK - 1), length=st.integers(1, 40))
    def add(self, offset: int, length: int) -> None:
        self.m.add(offset, length)
        end = min(offset + length, DISK)
        for b in range(offset, end):
            self.owed[b] = 1
        block = self.m.block
        for b in range(offset // block * block, min(DISK, -(-end // block) * block)):
            self.rounded[b] = 1

    @rule(max_length=st.integers(1, 80))
    def pop(self, max_length: int) -> None:
        before = self.covered()
        got: Optional[Tuple[int, int]] = self.m.pop(max_length)
        if got is None:
            assert not before
            return
        offset, length = got
        assert 0 < length <= max_length
        piece = set(range(offset, offset + length))
        assert piece <= before
        assert self.covered() == before - piece
        for b in piece:
            if b < DISK:  # the list does not clip at the disk's end; the bitmap does
                self.owed[b] = 0

    @rule(offset=st.integers(0, DISK), length=st.integers(0, 40))
    def intersects(self, offset: int, length: int) -> None:
        cov = self.covered()
        got = self.m.intersects(offset, offset + length)
        if any(b in cov for b in range(offset, offset + length)):
            assert got
        if got:  # a bitmap answers for whole blocks
            block = self.m.granularity or 1
            lo, hi = offset // block * block, -(-(offset + length) // block) * block
            assert any(b in cov for b in range(lo, hi))

    @rule()
    def clear(self) -> None:
        self.m.clear()
        self.owed = bytearray(DISK)
        self.rounded = bytearray(DISK)

    @invariant()
    def owed_is_covered_and_covered_was_added(self) -> None:
        cov = self.covered()
        assert all(b in cov for b in range(DISK) if self.owed[b])
        if self.m.granularity:
            assert all(self.rounded[b] for b in cov)
        assert self.m.bytes == len(cov)
        assert bool(self.m) == bool(cov)
        runs = self.m.ranges()
        assert runs == sorted(runs)


BitmapMapMachine.TestCase.settings = settings(
    deadline=None, max_examples=300, stateful_step_count=40)
test_bitmap_map_machine = BitmapMapMachine.TestCase
