"""Failed I/O on the protected disk, as the change log keeps it (``changelog.py``).

A write, zero or trim that failed leaves its range's content unknown: the old bytes, the
new ones, or a mix. A failed flush leaves every change since the last good flush unknown
(the device may have lost what it had cached). Either way the target cannot be told what
the disk holds, so the change log puts those ranges in its dirty map: the stream becomes
inconsistent, nothing is claimed synced, and the ranges are read back from the disk (and
shipped) once the device answers again. ``IoErrors`` counts the failures and keeps the
last one for status; ``unresolved`` stays set until the stream is consistent again.
``WrittenSinceFlush`` remembers the ranges a failed flush makes unknown, in bounded space:
past ``MAX_RANGES`` it keeps one range that covers them all.
"""

from __future__ import annotations

from typing import List, Tuple

MAX_RANGES = 1024


class IoErrors:
    def __init__(self) -> None:
        self.count = 0
        self.last = ""          # "write of 4096 bytes at 8192: [Errno 5] ..."
        self.unresolved = False  # a range it made unknown is not yet read back

    def failed(self, what: str, owes: bool) -> None:
        """One failure; ``owes`` when it left disk content unknown (not a read)."""
        self.count += 1
        self.last = what
        self.unresolved = self.unresolved or owes

    def resolved(self) -> None:
        self.unresolved = False

    def counters(self) -> dict:
        return {"io_errors": self.count, "io_error": self.last,
                "io_error_unresolved": int(self.unresolved)}


class WrittenSinceFlush:
    def __init__(self) -> None:
        self.ranges: List[Tuple[int, int]] = []

    def add(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        self.ranges.append((offset, length))
        if len(self.ranges) > MAX_RANGES:
            start = min(o for o, _ in self.ranges)
            end = max(o + n for o, n in self.ranges)
            self.ranges = [(start, end - start)]

    def take(self) -> List[Tuple[int, int]]:
        out, self.ranges = self.ranges, []
        return out
