"""The hold-back rule: how far a reader of a group's journal may go, disk by disk.

Theory of operation
-------------------
A replica must always be a crash-consistent state of its disk, the newest one known to be
whole. A record written while its disk was being resynced (``FLAG_INCONSISTENT``) is not
part of such a state on its own: the disk is whole again only at the resync's end, its
``KIND_CONSISTENT`` marker. So a reader that walks the journal in order (the applier
writing replicas, the scan that finds each disk's newest whole point, the straight path of
an initial sync) stops at the first such record of a disk that has been whole before,
until that disk's ``consistent`` marker is journaled too; then it may pass. A disk that has
never been whole (its initial sync is running) has no state to keep: it is read as it comes.

Each reader keeps its own ``HoldBack``: one per disk, its phase and the ``consistent``
markers journaled ahead of the reader (``pending``). The reader tells it of markers
journaled ahead (``journaled``) and asks, record by record, whether it may pass
(``admit``). This is the only place the rule is written.

Per disk::

    phase          event                   next
    initial-sync   consistent passed       whole
    whole          consistent passed       whole
    whole          held at a record        held
    held           held at a record        held
    held           consistent passed       whole

Holding in ``initial-sync`` is illegal: nothing is held before a disk was whole.
"""

from __future__ import annotations

import enum
from typing import Sequence

from formats.records import FLAG_INCONSISTENT, KIND_CONSISTENT

from .transitions import Table


class Phase(enum.Enum):
    INITIAL_SYNC = "initial-sync"  # never whole: every record passes
    WHOLE = "whole"                # whole once: a resync's records wait for its end
    HELD = "held"                  # the reader waits at a record written during a resync


class Event(enum.Enum):
    CONSISTENT = "consistent passed"
    HOLD = "held at a record"


DISK = Table[Phase, Event]("a disk under the hold-back rule", {
    (Phase.INITIAL_SYNC, Event.CONSISTENT): Phase.WHOLE,
    (Phase.WHOLE, Event.CONSISTENT): Phase.WHOLE,
    (Phase.WHOLE, Event.HOLD): Phase.HELD,
    (Phase.HELD, Event.HOLD): Phase.HELD,
    (Phase.HELD, Event.CONSISTENT): Phase.WHOLE,
})


class HoldBack:
    """One reader's view of the rule, for every disk of a group (see the module)."""

    def __init__(self, whole: Sequence[bool], pending: Sequence[int]) -> None:
        self.phases = [Phase.WHOLE if w else Phase.INITIAL_SYNC for w in whole]
        self.pending = list(pending)  # consistent markers journaled ahead of the reader

    def copy(self) -> HoldBack:
        other = HoldBack([], [])
        other.phases, other.pending = list(self.phases), list(self.pending)
        return other

    def whole(self, disk: int) -> bool:
        """Has the disk been whole once (its initial sync ended)?"""
        return self.phases[disk] is not Phase.INITIAL_SYNC

    def held(self, disk: int) -> bool:
        return self.phases[disk] is Phase.HELD

    def journaled(self, disk: int, kind: int) -> None:
        """A record of ``disk`` was journaled ahead of this reader."""
        if kind == KIND_CONSISTENT:
            self.pending[disk] += 1

    def admit(self, disk: int, kind: int, flags: int) -> bool:
        """May the reader pass this record of ``disk`` (a change or a disk marker, never a
        group marker)? When it may, it has: the disk's state moves past it."""
        if flags & FLAG_INCONSISTENT and self.whole(disk) and not self.pending[disk]:
            self._step(disk, Event.HOLD)
            return False
        if kind == KIND_CONSISTENT:
            self.pending[disk] -= 1
            self._step(disk, Event.CONSISTENT)
        return True

    def _step(self, disk: int, event: Event) -> None:
        self.phases[disk] = DISK.step(self.phases[disk], event)
