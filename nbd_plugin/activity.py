"""The activity log: which parts of the disk may be owed to the target after a crash.

Theory of operation (DRBD's activity log): the disk is cut in extents of ``extent_size``
bytes. Before the splitter writes to an extent, that extent must be in the log, durably;
so after an unclean stop (kill -9, host crash) only the extents in the log need a resync,
not the whole disk. An extent leaves the log (its slot is reused) only when it is *cold*:
nothing in it is owed to the target (no record unacked, no range dirty or in flight), which
the caller tells through ``is_cold``. When every slot holds a hot extent and another is
needed, the log sets its *overflow* flag durably: after a crash the whole disk is owed,
as without a log. The flag clears when the log is rewritten at the next clean start.

Writes to extents already in the log cost nothing here; a new extent costs one small
pwrite and one fdatasync of the log file, before the guest's write goes to the disk. In
the background, extents that are cold and were not written for a while leave the log
(``detach_idle`` / ``clear_slots`` / ``release_slots``), so that after a crash only what
was written lately is resynced.

The file, little-endian::

    offset  size  field
    0       4     magic     b"FAL1"
    4       4     version   1
    8       4     extent_shift   log2 of the extent size
    12      4     slots
    16      4     overflow  1 if the log could not hold every hot extent
    20      12    reserved
    32      8*N   slots: extent number + 1, or 0 for an empty slot

Slots are written one 8-byte word at a time (a torn sector cannot mix two values).
Standard library only; the caller serialises access.
"""

from __future__ import annotations

import os
import struct
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional

from formats.durable import ReplaceFile, write_all

MAGIC = b"FAL1"
VERSION = 1
HEADER = struct.Struct("<4sIIII12x")
assert HEADER.size == 32
SLOT = struct.Struct("<Q")

DEFAULT_EXTENT_SHIFT = 22  # 4 MiB
DEFAULT_SLOTS = 1024       # a 4 GiB hot set


class Recorded(NamedTuple):
    extents: List[int]   # extents that may be owed
    overflow: bool       # the log could not hold them all: the whole disk may be owed
    extent_size: int


def read(path: str) -> Optional[Recorded]:
    """What a previous run left in the log; None if there is no usable log."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    if len(raw) < HEADER.size:
        return None
    magic, version, shift, slots, overflow = HEADER.unpack_from(raw)
    if magic != MAGIC or version != VERSION or len(raw) < HEADER.size + slots * SLOT.size:
        return None
    extents = []
    for i in range(slots):
        (value,) = SLOT.unpack_from(raw, HEADER.size + i * SLOT.size)
        if value:
            extents.append(value - 1)
    return Recorded(sorted(extents), bool(overflow), 1 << shift)


class ActivityLog:
    def __init__(self, path: str, slots: int = DEFAULT_SLOTS,
                 extent_shift: int = DEFAULT_EXTENT_SHIFT) -> None:
        """Start an empty log at ``path`` (replacing any old one: read it first)."""
        self.path = path
        self.slots = slots
        self.shift = extent_shift
        self.extent_size = 1 << extent_shift
        self.overflow = False
        self.syncs = 0  # fdatasyncs made, for metrics
        self._lru: OrderedDict = OrderedDict()  # extent -> slot, least recently added first
        self._used: Dict[int, float] = {}         # extent -> when last written (self.now)
        self.now = 0.0  # a coarse clock, advanced by the caller (cheaper than a clock call)
        self._free = list(range(slots - 1, -1, -1))
        with ReplaceFile(path, 0o600) as out:
            write_all(out.fd, [HEADER.pack(MAGIC, VERSION, extent_shift, slots, 0),
                               bytes(slots * SLOT.size)])
            out.commit(close=False)
            self._fd = out.detach()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def extents(self, offset: int, length: int) -> range:
        return range(offset >> self.shift, (offset + max(length, 1) - 1 >> self.shift) + 1)

    def covers(self, offset: int, length: int) -> bool:
        """Are all extents of the range in the log? Marks them used now."""
        lru, used, now = self._lru, self._used, self.now
        for e in self.extents(offset, length):
            if e not in lru:
                return False
            used[e] = now
        return True

    def ensure(self, offset: int, length: int, is_cold: Callable[[int], bool]) -> None:
        """Put every extent of the range in the log, durably, before it is written."""
        missing = [e for e in self.extents(offset, length) if e not in self._lru]
        if not missing:
            return
        changed = False
        for extent in missing:
            slot = self._take_slot(is_cold)
            if slot is None:
                if not self.overflow:
                    self.overflow = True
                    os.pwrite(self._fd, HEADER.pack(MAGIC, VERSION, self.shift, self.slots, 1),
                              0)
                    changed = True
                continue
            self._lru[extent] = slot
            self._used[extent] = self.now
            os.pwrite(self._fd, SLOT.pack(extent + 1), HEADER.size + slot * SLOT.size)
            changed = True
        if changed:
            os.fdatasync(self._fd)
            self.syncs += 1

    def _take_slot(self, is_cold: Callable[[int], bool]) -> Optional[int]:
        if self._free:
            return self._free.pop()
        for extent in self._lru:  # oldest first
            if is_cold(extent):
                self._used.pop(extent, None)
                return self._lru.pop(extent)
        return None

    # Trimming, so that a crash owes only what was written lately (the link thread, once a
    # second): detach under the caller's lock, clear the slots without it, then release.

    def detach_idle(self, is_cold: Callable[[int], bool], idle: float) -> List[int]:
        """Take out of the log the cold extents unused for ``idle`` seconds; their slots."""
        slots = []
        for extent in [e for e, t in self._used.items() if self.now - t >= idle]:
            if is_cold(extent):
                del self._used[extent]
                slots.append(self._lru.pop(extent))
        return slots

    def clear_slots(self, slots: List[int]) -> None:
        """Write the slots empty, durably. No lock needed: the slots belong to nobody."""
        for slot in slots:
            os.pwrite(self._fd, SLOT.pack(0), HEADER.size + slot * SLOT.size)
        if slots:
            os.fdatasync(self._fd)
            self.syncs += 1

    def release_slots(self, slots: List[int]) -> None:
        self._free.extend(slots)

    def __len__(self) -> int:
        return len(self._lru)
