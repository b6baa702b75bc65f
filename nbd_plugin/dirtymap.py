"""The dirty map: regions of a disk whose changes were not queued for shipping.

Theory of operation: the map starts as a sorted list of disjoint, non-adjacent byte ranges
``[start, end)``, exact to the byte. Adding a range merges it with whatever it touches.

Each range costs Python objects (``RANGE_COST`` bytes), so a long outage of scattered writes
would outgrow any budget. When the map knows its disk's size (``for_budget(budget, size)``),
the list holds at most a quarter of the budget; past that the map turns into a bitmap, one
bit per ``block`` bytes, the smallest power of two from 4 KiB up whose bitmap takes at most
half the budget (4 KiB up to 64 GiB with the default 16 MiB budget: 2 MiB of bits). From
then on memory is fixed and the only detail lost is the rounding of each write out to its
blocks, as DRBD's bitmap does. A disk too large for a bitmap of blocks of at most
``MAX_BLOCK`` in half the budget keeps the list, and the list keeps less detail instead: it
merges the ranges separated by the smallest gaps (blocks 2, 5, 9 -> 2-9 -> 2-20), down to
three quarters of its budget, so a long outage costs resync bytes, never memory.

Resync takes ranges out with ``pop`` in ascending order from a cursor, so that an interrupted
resync carries on where it stopped rather than starting over. A bitmap hands out whole
blocks; when a caller takes less than a block, the rest of it waits in ``_spill``, an exact
range, for the next ``pop``.

Pure logic, no locking: the caller (``changelog.ChangeLog``) serialises access.
"""

from __future__ import annotations

import re
from bisect import bisect_left, bisect_right
from typing import Iterator, List, Optional, Tuple

# Memory one range costs at the peak of a coarsening pass (two list slots and two ints at
# rest, about 85 bytes on CPython 3.11; the pass's sorted index and merge set about double
# that), measured with tracemalloc by tests/test_dirtymap_budget.py.
RANGE_COST = 176
DEFAULT_BUDGET = 16 * 1024 * 1024
MIN_BLOCK = 4096
MAX_BLOCK = 1024 * 1024  # the splitter's resync piece: a bitmap coarser than that is not kept

_NONZERO = re.compile(b"[^\x00]")
_NOTFULL = re.compile(b"[^\xff]")
_POPCOUNT = bytes(bin(i).count("1") for i in range(256))


def _lowest(v: int) -> int:
    """The index of the lowest set bit of ``v`` (> 0)."""
    return (v & -v).bit_length() - 1


class Bitmap:
    """One bit per block, bit ``i`` of byte ``i >> 3`` for block ``i``; counts its set bits."""

    def __init__(self, nbits: int) -> None:
        self.nbits = nbits
        self.bits = bytearray(-(-nbits // 8))
        self.count = 0

    def copy(self) -> Bitmap:
        other = Bitmap(0)
        other.nbits, other.bits, other.count = self.nbits, bytearray(self.bits), self.count
        return other

    def first_set(self, start: int) -> int:
        """The first set bit at or after ``start``; -1 if none."""
        i = start >> 3
        if i >= len(self.bits):
            return -1
        v = self.bits[i] >> (start & 7)
        if v:
            return start + _lowest(v)
        m = _NONZERO.search(self.bits, i + 1)
        if m is None:
            return -1
        i = m.start()
        return i * 8 + _lowest(self.bits[i])

    def first_clear(self, start: int) -> int:
        """The first clear bit at or after ``start``; ``nbits`` if none."""
        i = start >> 3
        if i >= len(self.bits):
            return self.nbits
        v = (~self.bits[i] & 0xFF) >> (start & 7)
        if v:
            return min(self.nbits, start + _lowest(v))
        m = _NOTFULL.search(self.bits, i + 1)
        if m is None:
            return self.nbits
        i = m.start()
        return min(self.nbits, i * 8 + _lowest(~self.bits[i] & 0xFF))

    def set(self, b0: int, b1: int) -> int:
        """Set bits ``[b0, b1)``; how many were clear."""
        return self._change(b0, b1, True)

    def clear(self, b0: int, b1: int) -> int:
        """Clear bits ``[b0, b1)``; how many were set."""
        return self._change(b0, b1, False)

    def _change(self, b0: int, b1: int, on: bool) -> int:
        b1 = min(b1, self.nbits)
        if b1 <= b0:
            return 0
        bits = self.bits
        first, last = b0 >> 3, (b1 - 1) >> 3
        if first == last:
            masks = [(first, ((1 << (b1 - b0)) - 1) << (b0 & 7))]
        else:
            masks = [(first, (0xFF << (b0 & 7)) & 0xFF), (last, (1 << (((b1 - 1) & 7) + 1)) - 1)]
        changed = 0
        for i, mask in masks:
            old = bits[i]
            if on:
                changed += _POPCOUNT[mask & ~old & 0xFF]
                bits[i] = old | mask
            else:
                changed += _POPCOUNT[mask & old]
                bits[i] = old & ~mask & 0xFF
        n = last - first - 1
        if n > 0:
            middle = bits[first + 1:last]
            ones = 0 if _NONZERO.search(middle) is None else sum(middle.translate(_POPCOUNT))
            changed += n * 8 - ones if on else ones
            bits[first + 1:last] = (b"\xff" if on else b"\x00") * n
        self.count += changed if on else -changed
        return changed



class DirtyMap:
    @classmethod
    def for_budget(cls, budget_bytes: int = DEFAULT_BUDGET,
                   disk_size: Optional[int] = None) -> DirtyMap:
        """A map whose memory, coarsening included, stays within ``budget_bytes``; given the
        disk's size, one that turns into a bitmap rather than lose more detail."""
        if disk_size is not None and disk_size > 0:
            block = MIN_BLOCK
            while block <= MAX_BLOCK and -(-disk_size // block) > budget_bytes // 2 * 8:
                block *= 2
            if block <= MAX_BLOCK:
                return cls(max_ranges=max(2, budget_bytes // 4 // RANGE_COST),
                           disk_size=disk_size, block=block)
        return cls(max_ranges=max(2, budget_bytes // RANGE_COST))

    def __init__(self, max_ranges: int = 100_000, disk_size: Optional[int] = None,
                 block: int = 0) -> None:
        if max_ranges < 2:
            raise ValueError("max_ranges must be at least 2")
        if block and (disk_size is None or disk_size <= 0 or block & (block - 1)):
            raise ValueError("a bitmap needs the disk's size and a power-of-two block")
        self.max_ranges = max_ranges
        self.disk_size = disk_size
        self.block = block  # the bitmap's block once the map turns into one
        self._starts: List[int] = []
        self._ends: List[int] = []
        self._bytes = 0
        self._cursor = 0
        self._bitmap: Optional[Bitmap] = None
        self._spill: Optional[Tuple[int, int]] = None  # the untaken rest of a popped block
        self.coarsened_bytes = 0  # bytes added by lost detail, for metrics

    def empty_copy(self) -> DirtyMap:
        """A new, empty map of the same shape and budget."""
        return DirtyMap(self.max_ranges, self.disk_size, self.block)

    @property
    def granularity(self) -> int:
        """0 while the map is exact ranges; the bitmap's block size once it is one."""
        return self.block if self._bitmap is not None else 0

    def __len__(self) -> int:
        """Ranges held; for a bitmap, its dirty blocks (an upper bound on its runs)."""
        if self._bitmap is not None:
            return self._bitmap.count + (self._spill is not None)
        return len(self._starts)

    def __bool__(self) -> bool:
        if self._bitmap is not None:
            return bool(self._bitmap.count) or self._spill is not None
        return bool(self._starts)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        if self._bitmap is not None:
            return iter([(o, o + n) for o, n in self.ranges()])
        return iter(list(zip(self._starts, self._ends)))

    @property
    def bytes(self) -> int:
        """Bytes a resync of the whole map would read."""
        bm = self._bitmap
        if bm is None:
            return self._bytes
        assert self.disk_size is not None
        total = bm.count * self.block
        if bm.count and bm.bits[(bm.nbits - 1) >> 3] >> ((bm.nbits - 1) & 7) & 1:
            total -= bm.nbits * self.block - self.disk_size  # the short last block
        if self._spill is not None:
            total += self._spill[1] - self._spill[0]
        return total

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        if self._bitmap is not None:
            self._set_blocks(offset, offset + length)
            return
        start, end = offset, offset + length
        # Ranges that overlap or touch [start, end) are at indexes lo..hi-1.
        lo = bisect_left(self._ends, start)
        hi = bisect_right(self._starts, end)
        if lo < hi:
            start = min(start, self._starts[lo])
            end = max(end, self._ends[hi - 1])
            removed = sum(self._ends[i] - self._starts[i] for i in range(lo, hi))
        else:
            removed = 0
        self._starts[lo:hi] = [start]
        self._ends[lo:hi] = [end]
        self._bytes += (end - start) - removed
        if len(self._starts) > self.max_ranges:
            if self.block:
                self._to_bitmap()
            else:
                self._coarsen(self.max_ranges * 3 // 4)

    def _set_blocks(self, start: int, end: int) -> None:
        assert self._bitmap is not None and self.disk_size is not None
        end = min(end, self.disk_size)
        if end <= start:
            return
        b0, b1 = start // self.block, -(-end // self.block)
        if self._spill is not None and b0 <= self._spill[0] // self.block < b1:
            self._spill = None  # it lies within one block, which the bitmap now holds
        new = self._bitmap.set(b0, b1)
        if new:
            # What rounding out to whole blocks added beyond the bytes asked for.
            added = min(new * self.block, min(b1 * self.block, self.disk_size) - b0 * self.block)
            self.coarsened_bytes += max(0, added - (end - start))

    def _to_bitmap(self) -> None:
        """Trade the list for a bitmap: memory stays fixed from here on."""
        assert self.disk_size is not None
        self._bitmap = Bitmap(-(-self.disk_size // self.block))
        starts, ends = self._starts, self._ends
        self._starts, self._ends, self._bytes = [], [], 0
        for start, end in zip(starts, ends):
            self._set_blocks(start, end)

    def _coarsen(self, target: int) -> None:
        """Merge across the smallest gaps until at most ``target`` ranges remain."""
        n = len(self._starts)
        merges = n - max(target, 1)
        if merges <= 0:
            return
        gaps = sorted(range(n - 1), key=lambda i: self._starts[i + 1] - self._ends[i])
        join = set(gaps[:merges])  # gap i joins range i with range i + 1
        starts: List[int] = []
        ends: List[int] = []
        for i in range(n):
            if i > 0 and (i - 1) in join:
                gap = self._starts[i] - ends[-1]
                self.coarsened_bytes += gap
                self._bytes += gap
                ends[-1] = self._ends[i]
            else:
                starts.append(self._starts[i])
                ends.append(self._ends[i])
        self._starts, self._ends = starts, ends

    def pop(self, max_length: int) -> Optional[Tuple[int, int]]:
        """Remove and return up to ``max_length`` bytes, the first range at or after the
        cursor (wrapping round), as ``(offset, length)``; None when the map is empty."""
        if self._bitmap is not None:
            return self._pop_blocks(max_length)
        if not self._starts:
            return None
        i = bisect_right(self._ends, self._cursor)
        if i >= len(self._starts):
            i, self._cursor = 0, 0
        start = max(self._starts[i], self._cursor)
        end = min(self._ends[i], start + max_length)
        if start > self._starts[i] and end < self._ends[i] and len(self) >= self.max_ranges:
            # Splitting range i would pass the budget: take its head instead.
            start = self._starts[i]
            end = min(self._ends[i], start + max_length)
        if start == self._starts[i]:
            if end == self._ends[i]:
                del self._starts[i]
                del self._ends[i]
            else:
                self._starts[i] = end
        else:
            # The cursor is inside range i: split it.
            if end == self._ends[i]:
                self._ends[i] = start
            else:
                self._starts.insert(i + 1, end)
                self._ends.insert(i + 1, self._ends[i])
                self._ends[i] = start
        self._bytes -= end - start
        self._cursor = end
        return start, end - start

    def _pop_blocks(self, max_length: int) -> Optional[Tuple[int, int]]:
        assert self._bitmap is not None and self.disk_size is not None
        if self._spill is not None:
            start, end = self._spill
            taken = min(end, start + max_length)
            self._spill = (taken, end) if taken < end else None
            self._cursor = taken
            return start, taken - start
        bm = self._bitmap
        first = bm.first_set(self._cursor // self.block)
        if first < 0:
            first = bm.first_set(0)
            if first < 0:
                return None
        last = min(bm.first_clear(first), first + max(1, -(-max_length // self.block)))
        bm.clear(first, last)
        start, end = first * self.block, min(last * self.block, self.disk_size)
        taken = min(end, start + max_length)
        if taken < end:
            self._spill = (taken, end)
        self._cursor = taken
        return start, taken - start

    def intersects(self, offset: int, end: int) -> bool:
        """Does any dirty range overlap ``[offset, end)``? (A bitmap answers for the whole
        blocks the range touches.)"""
        if end <= offset:
            return False
        if self._bitmap is not None:
            if self._spill is not None and self._spill[0] < end and offset < self._spill[1]:
                return True
            b = self._bitmap.first_set(offset // self.block)
            return 0 <= b < -(-end // self.block)
        i = bisect_right(self._ends, offset)
        return i < len(self._starts) and self._starts[i] < end

    def copy(self) -> DirtyMap:
        """An independent map with the same dirty regions."""
        m = self.empty_copy()
        m._starts, m._ends, m._bytes = list(self._starts), list(self._ends), self._bytes
        m._bitmap = None if self._bitmap is None else self._bitmap.copy()
        m._spill, m._cursor, m.coarsened_bytes = self._spill, self._cursor, self.coarsened_bytes
        return m

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._bytes = 0
        self._cursor = 0
        self._spill = None
        if self._bitmap is not None:
            self._bitmap = Bitmap(self._bitmap.nbits)

    def ranges(self) -> List[Tuple[int, int]]:
        """The map as ``(offset, length)`` pairs in ascending order, for persistence."""
        if self._bitmap is None:
            return [(s, e - s) for s, e in zip(self._starts, self._ends)]
        assert self.disk_size is not None
        out: List[Tuple[int, int]] = []
        bm, block, pos = self._bitmap, self.block, 0
        while True:
            first = bm.first_set(pos)
            if first < 0:
                break
            pos = bm.first_clear(first)
            out.append((first * block, min(pos * block, self.disk_size) - first * block))
        if self._spill is not None:
            out.append((self._spill[0], self._spill[1] - self._spill[0]))
            out.sort()
        return out
