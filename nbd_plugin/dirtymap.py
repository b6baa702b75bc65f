"""The dirty map: regions of a disk whose changes were not queued for shipping.

Theory of operation: the map is a sorted list of disjoint, non-adjacent byte ranges
``[start, end)``. Adding a range merges it with whatever it touches. The map never holds more
than ``max_ranges`` ranges: when an add would pass that, the map keeps less detail by merging
the ranges separated by the smallest gaps (blocks 2, 5, 9 -> 2-9 -> 2-20), down to three
quarters of the budget, so a long outage costs resync bytes, never memory.

Resync takes ranges out with ``pop`` in ascending order from a cursor, so that an interrupted
resync carries on where it stopped rather than starting over.

Pure logic, no locking: the caller (``changelog.ChangeLog``) serialises access.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from typing import Iterator, List, Optional, Tuple

# Memory one range costs at the peak of a coarsening pass (two list slots and two ints at
# rest, about 85 bytes on CPython 3.11; the pass's sorted index and merge set about double
# that), measured with tracemalloc by tests/test_dirtymap_budget.py.
RANGE_COST = 176
DEFAULT_BUDGET = 16 * 1024 * 1024


class DirtyMap:
    @classmethod
    def for_budget(cls, budget_bytes: int = DEFAULT_BUDGET) -> DirtyMap:
        """A map whose memory, coarsening included, stays within ``budget_bytes``."""
        return cls(max_ranges=max(2, budget_bytes // RANGE_COST))

    def __init__(self, max_ranges: int = 100_000) -> None:
        if max_ranges < 2:
            raise ValueError("max_ranges must be at least 2")
        self.max_ranges = max_ranges
        self._starts: List[int] = []
        self._ends: List[int] = []
        self._bytes = 0
        self._cursor = 0
        self.coarsened_bytes = 0  # bytes added by lost detail, for metrics

    def __len__(self) -> int:
        return len(self._starts)

    def __bool__(self) -> bool:
        return bool(self._starts)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        return iter(list(zip(self._starts, self._ends)))

    @property
    def bytes(self) -> int:
        """Bytes a resync of the whole map would read."""
        return self._bytes

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
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
            self._coarsen(self.max_ranges * 3 // 4)

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

    def intersects(self, offset: int, end: int) -> bool:
        """Does any dirty range overlap ``[offset, end)``?"""
        i = bisect_right(self._ends, offset)
        return i < len(self._starts) and self._starts[i] < end

    def clear(self) -> None:
        self._starts.clear()
        self._ends.clear()
        self._bytes = 0
        self._cursor = 0

    def ranges(self) -> List[Tuple[int, int]]:
        """The map as ``(offset, length)`` pairs, for persistence."""
        return [(s, e - s) for s, e in zip(self._starts, self._ends)]
