"""Where a disk's change stream stands, and what a record's (generation, sequence) is to it.

A splitter numbers its records 1, 2, 3... within a generation, and starts a new generation
at every start (generations only grow). So for a disk whose last record taken is (G, S):

    a record (g, s) is   DUPLICATE  if g < G, or g == G and s <= S   (already taken: drop)
                         NEXT       if g == G and s == S + 1, or g > G and s == 1
                         GAP        otherwise                       (something is missing)

Site B applies this to what arrives (a GAP there is the peer breaking the protocol); the
source applies it to what its splitters send after a rewind (a GAP there asks the splitter
to rewind again). Pure logic: no I/O; clocks are passed in.

``Cursor`` is the receiving side's (site B's admission of a batch); ``ForwardCursor`` the
sending side's, with the rewind rules below.

The sending side
----------------
A splitter numbers its records ``(gen, seq)``: a generation per state file, a sequence from
1 within it. When a session opens, the target says the newest point it holds durably; the
cursor then expects the next record after it (same generation), or the first of a newer
generation, and asks the splitter to REWIND (send again everything not acked). From there it
takes records strictly in sequence: a duplicate (or another generation) is dropped; a gap
(records the splitter is still sending from before the rewind) stops the batch there and
asks for another rewind, at most once every ``REWIND_INTERVAL`` seconds. A gap over records
that the splitter has already freed (it heard an ack for them) means the target lost what it
acked: the cursor breaks, and so does a splitter older than the target's generation (its
state file was lost). Both need the group protected again.

    state       start ok     start refused   stop        gap over freed records
    IDLE        FORWARDING   BROKEN          IDLE        -
    FORWARDING  FORWARDING   BROKEN          IDLE        BROKEN
    BROKEN      FORWARDING   BROKEN          BROKEN      -

A BROKEN cursor keeps its ``error`` until a start succeeds. A move not in the table raises
``IllegalTransition`` (a bug here). It serves any change stream, not only a splitter's.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Dict, FrozenSet, List, NamedTuple, Optional, Sequence, Tuple

from ..errors import IllegalTransition

Point = Tuple[int, int]


class Step(Enum):
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


REWIND_INTERVAL = 1.0


class CursorState(Enum):
    IDLE = "idle"
    FORWARDING = "forwarding"
    BROKEN = "broken"


_IDLE, _FORWARDING, _BROKEN = CursorState.IDLE, CursorState.FORWARDING, CursorState.BROKEN
CURSOR_MOVES: Dict[CursorState, FrozenSet[CursorState]] = {
    _IDLE: frozenset({_FORWARDING, _BROKEN, _IDLE}),
    _FORWARDING: frozenset({_FORWARDING, _BROKEN, _IDLE}),
    _BROKEN: frozenset({_FORWARDING, _BROKEN}),
}


class Start(NamedTuple):
    ack: Optional[Point]    # pass this ack on to the splitter first
    rewind: bool            # then ask it to REWIND


class Taken(NamedTuple):
    records: List[Any]      # to forward, in sequence
    whole: bool             # no record left out by a gap: the batch's watermark holds
    rewind: bool            # ask the splitter to REWIND now


class ForwardCursor:
    """The sending side: what a source forwards of one splitter's records (see the module)."""

    def __init__(self) -> None:
        self.state = CursorState.IDLE
        self.expected: Optional[Point] = None   # the next record to forward
        self.error: Optional[str] = None
        self._rewind_at = 0.0

    def _go(self, new: CursorState) -> None:
        if new not in CURSOR_MOVES[self.state]:
            raise IllegalTransition("cursor: %s -> %s" % (self.state.value, new.value))
        self.state = new

    def start(self, gen: int, durable: Point, now: float) -> Start:
        """A session (or a splitter connection) begins: the target holds ``durable``."""
        tgen, tseq = durable
        if gen < tgen:
            self._go(_BROKEN)
            self.expected = None
            self.error = ("splitter generation %d is older than the target's %d: the "
                          "splitter's state file was lost; unprotect and protect again"
                          % (gen, tgen))
            return Start(None, False)
        self._go(_FORWARDING)
        self.expected = (gen, tseq + 1) if gen == tgen else (gen, 1)
        self.error = None
        self._rewind_at = now
        return Start(durable if gen == tgen else None, True)

    def stop(self) -> None:
        """Forward nothing until the next start (a broken cursor stays broken)."""
        self._go(_BROKEN if self.state is _BROKEN else _IDLE)
        self.expected = None

    def take(self, records: Sequence[Any], freed: Tuple[Any, int], now: float) -> Taken:
        """The records to forward, strictly in sequence. ``freed`` is the splitter's
        ``(gen, acked_seq)``: what it has dropped from its queue."""
        if self.expected is None:
            return Taken([], False, False)
        out = []
        gen, seq = self.expected
        whole = True
        rewind = False
        for r in records:
            if r.gen != gen or step((gen, seq - 1), r.gen, r.seq) is Step.DUPLICATE:
                continue
            if r.seq > seq:  # Step.GAP
                if freed[0] == gen and freed[1] >= seq:
                    # The splitter freed these records on an ack: the target has lost them.
                    self._go(_BROKEN)
                    self.expected = None
                    self.error = ("site B no longer holds records %d/%d.. that it acked "
                                  "(its data was lost or replaced): unprotect and protect "
                                  "the group again for a full sync" % (gen, seq))
                    return Taken([], False, False)
                if now - self._rewind_at > REWIND_INTERVAL:
                    self._rewind_at = now
                    rewind = True
                whole = False
                break
            out.append(r)
            seq += 1
        self.expected = (gen, seq)
        return Taken(out, whole, rewind)
