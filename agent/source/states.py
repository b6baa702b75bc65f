"""The states a protected group and its disks show (``ferry status --json``), as enums.

Theory of operation
-------------------
A group's shipper is in exactly one ``ShipperState``. It starts CONNECTING, once only; a
session that opens makes it REPLICATING; the administrator's pause makes it PAUSED; a
session that cannot open or ends shows why (TARGET_*). From any state but CONNECTING the
shipper may go to any other, itself included (a link lost twice is lost again; a pause and
a resume between two looks leave a new session REPLICATING again), and nothing goes back to
CONNECTING: ``ShipperState.to`` raises ``IllegalTransition`` for that.

A disk's state is not kept but read off its link and its shipper each time status is asked
(``disk_state``, first row that matches wins):

    the link's sequence is broken           -> error
    no splitter connected                   -> splitter-down
    a write or flush on the disk failed and -> source-io-error
    its ranges are not yet read back
    the shipper has no session              -> the shipper's state, or bitmap while a
                                               resync waits (unless paused)
    a resync or initial sync runs, or its   -> initial-sync / resyncing
    end (the splitter's ``consistent``
    record) is not yet acked by site B
    otherwise                               -> replicating

A group shows the first of its disks' states in ``GROUP_STATE_ORDER`` (the worst first),
else replicating. Each enum's value is the string that status has always shown.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, Dict, FrozenSet, Mapping, Optional

from ..errors import IllegalTransition


class ShipperState(str, Enum):
    CONNECTING = "connecting"
    REPLICATING = "replicating"
    PAUSED = "paused"
    TARGET_UNREACHABLE = "target-unreachable"
    TARGET_UNPAIRED = "target-unpaired"
    TARGET_ERROR = "target-error"
    TARGET_STORAGE_ERROR = "target-storage-error"
    JOURNAL_FULL = "journal-full"  # site B's file system is full; it resumes once freed
    FENCED = "fenced"  # the group failed over to its target: the splitters refuse writes

    def to(self, new: ShipperState) -> ShipperState:
        """``new``, if the table allows the move from here; else IllegalTransition."""
        if new not in SHIPPER_MOVES[self]:
            raise IllegalTransition("shipper: %s -> %s" % (self.value, new.value))
        return new


_ANY_BUT_CONNECTING: FrozenSet[ShipperState] = frozenset(
    s for s in ShipperState if s is not ShipperState.CONNECTING)
SHIPPER_MOVES: Dict[ShipperState, FrozenSet[ShipperState]] = {
    s: _ANY_BUT_CONNECTING for s in ShipperState}


class DiskState(str, Enum):
    ERROR = "error"
    SOURCE_IO_ERROR = "source-io-error"
    SPLITTER_DOWN = "splitter-down"
    BITMAP = "bitmap"
    INITIAL_SYNC = "initial-sync"
    RESYNCING = "resyncing"
    REPLICATING = "replicating"


GROUP_STATE_ORDER = tuple(s.value for s in (
    DiskState.ERROR, ShipperState.FENCED, DiskState.SOURCE_IO_ERROR, DiskState.SPLITTER_DOWN,
    ShipperState.TARGET_UNPAIRED, ShipperState.TARGET_UNREACHABLE, ShipperState.TARGET_ERROR,
    ShipperState.TARGET_STORAGE_ERROR, ShipperState.JOURNAL_FULL, ShipperState.CONNECTING,
    ShipperState.PAUSED,
    DiskState.BITMAP, DiskState.INITIAL_SYNC, DiskState.RESYNCING))


def disk_state(broken: bool, connected: bool, shipper: Optional[ShipperState], live: bool,
               counters: Mapping[str, Any]) -> str:
    """A disk's state as status shows it (the table in the module's docstring)."""
    if broken:
        return DiskState.ERROR.value
    if not connected:
        return DiskState.SPLITTER_DOWN.value
    if counters.get("io_error_unresolved"):
        return DiskState.SOURCE_IO_ERROR.value
    if shipper is None or not live:
        state = shipper.value if shipper is not None else ShipperState.PAUSED.value
        if counters.get("inconsistent") and state not in (ShipperState.PAUSED.value,
                                                          ShipperState.FENCED.value):
            return DiskState.BITMAP.value
        return state
    if counters.get("inconsistent"):
        return (DiskState.INITIAL_SYNC if counters.get("initial") else DiskState.RESYNCING).value
    if counters.get("consistent_seq", 0) > counters.get("acked_seq", 0):
        # Read and queued, not yet held by site B: nothing consistent to restore there yet.
        return (DiskState.INITIAL_SYNC if counters.get("consistent_initial")
                else DiskState.RESYNCING).value
    return DiskState.REPLICATING.value


def group_state(disk_states: Any) -> str:
    """The worst of a group's disks' states."""
    states = set(disk_states)
    return next((s for s in GROUP_STATE_ORDER if s in states), DiskState.REPLICATING.value)
