"""Where a disk's change stream stands, and what a record's (generation, sequence) is to it.

A splitter numbers its records 1, 2, 3... within a generation, and starts a new generation
at every start (generations only grow). So for a disk whose last record taken is (G, S):

    a record (g, s) is   DUPLICATE  if g < G, or g == G and s <= S   (already taken: drop)
                         NEXT       if g == G and s == S + 1, or g > G and s == 1
                         GAP        otherwise                       (something is missing)

Site B applies this to what arrives (a GAP there is the peer breaking the protocol); the
source applies it to what its splitters send after a rewind (a GAP there asks the splitter
to rewind again). Pure logic: no I/O, no clocks.
"""

from __future__ import annotations

import enum
from typing import Tuple

Point = Tuple[int, int]


class Step(enum.Enum):
    DUPLICATE = "duplicate"
    NEXT = "next"
    GAP = "gap"


def step(last: Point, gen: int, seq: int) -> Step:
    """What record (gen, seq) is after ``last`` (see the module)."""
    lgen, lseq = last
    if gen < lgen or (gen == lgen and seq <= lseq):
        return Step.DUPLICATE
    if (gen == lgen and seq == lseq + 1) or (gen > lgen and seq == 1):
        return Step.NEXT
    return Step.GAP


class Cursor:
    """One disk's position in its stream; ``take`` moves it on over the next record."""

    __slots__ = ("point",)

    def __init__(self, point: Point = (0, 0)) -> None:
        self.point = point

    def step(self, gen: int, seq: int) -> Step:
        return step(self.point, gen, seq)

    def take(self, gen: int, seq: int) -> Step:
        """Classify (gen, seq) and, if it is NEXT, stand on it."""
        s = step(self.point, gen, seq)
        if s is Step.NEXT:
            self.point = (gen, seq)
        return s

    def __repr__(self) -> str:
        return "Cursor(%d/%d)" % self.point
