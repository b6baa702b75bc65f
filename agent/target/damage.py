"""Damage in a journal segment: what a scan of its bytes tells a torn tail from damage.

Theory of operation
-------------------
``append`` fdatasyncs a batch before the source is acked, then writes the segment's new end
into ``journal/acked`` (``AckedMark``: one small pwrite, no fsync, a crc of its own). After
a crash that file holds the end of an acked batch or an older one (the kernel writes it
back later), never a position past what was acked: it is a lower bound of what B owes.

``classify`` walks a segment's bytes record by record. Where a record does not hold it
looks forward for the next record that does (its magic, a known kind and a matching
checksum). Then::

    the bytes that fail            acked end        verdict
    are followed by a record       any              damage [bad, next): kept, reported
    run to the end of the file     at or before     torn tail: cut (never acked)
    run to the end of the file     after them       damage [bad, acked): kept, reported;
                                                    past acked: a torn tail, cut
    (the file ends)                past the end     damage: acked bytes are missing

so only bytes after the last acked record are ever cut, and a record failing its checks
with valid records after it is never dropped. Without a mark (a journal from before it, or
a lost file) the structure alone decides: only failing bytes at the end are a torn tail.

A ``Damage`` names the segment, the byte range, the bytes missing past the end of the
file, and where it is known (a header that still fits its place, or the index entry of a
record that failed when read) the disk range its record covered: what the repair from the
source needs. Standard library only, no I/O but ``AckedMark`` and ``load``/``save``.

Repair (``Mend``)
-----------------
Damage is repaired when records journaled after it cover every byte its record may have
covered (``needs``: the range of a record the index knew, or the whole of every disk when
its header cannot be trusted), so no state from there on depends on it. The source sends
those ranges again when asked (``repairs.py``), and any later write over them counts too.
The damage then records ``repaired_at`` (the journal position after the covering record
that completed it) and ``repaired_points`` (per disk, the newest covering record's
``(gen, seq)``): a point whose cut is at or past those points for every disk needs nothing
from the damage; points between the damage and them stay refused (a gap in history).
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import asdict, dataclass
from typing import Any, Callable, Dict, List, Optional, Tuple

from formats.durable import write_atomic
from formats.records import (
    DATA_KINDS,
    JOURNAL_KINDS,
    KIND_APPLIED,
    KIND_CHECKPOINT,
    KIND_CONSISTENT,
    MAP_KINDS,
)
from formats.segment import MAGIC, RECORD

# A record decoder: the position after the record at ``pos``, or None if it does not hold.
Decode = Callable[[memoryview, int], Optional[int]]


@dataclass
class Damage:
    """Bytes ``[offset, end)`` of segment ``segment`` that hold no record B can vouch for,
    and ``missing`` acked bytes past the end of the file."""
    segment: int
    offset: int
    end: int
    missing: int = 0
    found: str = "open"              # "open" (a scan at open) or "read" (a checked read)
    disk: Optional[int] = None       # the damaged record's disk, range and stream point,
    disk_offset: Optional[int] = None  # where known
    disk_length: Optional[int] = None
    kind: Optional[int] = None       # the damaged record's kind, when its index entry knew
    repaired_at: Optional[List[int]] = None       # [segment, offset]: see Mend
    repaired_points: Optional[List[List[int]]] = None  # [[disk, gen, seq], ...]

    def to_json(self) -> Dict[str, Any]:
        return asdict(self)

    def key(self) -> Tuple[int, int]:
        return self.segment, self.offset

    def covers(self, points: List[Tuple[int, int]]) -> bool:
        """Is the damage repaired for a state whose disks are at ``points``?"""
        if self.repaired_points is None:
            return False
        return all(tuple(points[d]) >= (g, s) for d, g, s in self.repaired_points
                   if d < len(points))


def needs(d: Damage, sizes: List[int]) -> Dict[int, List[Tuple[int, int]]]:
    """The disk ranges ``[start, end)`` the damaged record may have covered: what later
    records must cover before the damage is repaired (see the module). A range from a
    failing header is not trusted (its disk and offset fields may be the bytes that
    changed): then every disk, whole."""
    if d.found == "read" and d.kind is not None:
        if d.disk is not None and d.disk_length and d.disk_offset is not None:
            return {d.disk: [(d.disk_offset, d.disk_offset + d.disk_length)]}
        if d.kind == KIND_CONSISTENT and d.disk is not None:
            return {d.disk: [(0, sizes[d.disk])]}
        return {}  # a marker or a record of no range: it held no data
    return {i: [(0, n)] for i, n in enumerate(sizes) if n}


class Mend:
    """Follows the records journaled after a damage until they cover what it needs."""

    COVERING = (*MAP_KINDS, KIND_APPLIED)

    def __init__(self, need: Dict[int, List[Tuple[int, int]]]) -> None:
        self.need = {k: list(v) for k, v in need.items() if v}
        self.points: Dict[int, Tuple[int, int]] = {}

    @property
    def done(self) -> bool:
        return not self.need

    def feed(self, disk: int, kind: int, gen: int, seq: int, offset: int,
             length: int) -> bool:
        """A record journaled after the damage; True once everything is covered."""
        left = self.need.get(disk)
        if left is None or kind not in self.COVERING or not length:
            return self.done
        end = offset + length
        out: List[Tuple[int, int]] = []
        for s, e in left:
            if e <= offset or s >= end:
                out.append((s, e))
                continue
            if s < offset:
                out.append((s, offset))
            if e > end:
                out.append((end, e))
        if out != left:
            self.points[disk] = (gen, seq)
        if out:
            self.need[disk] = out
        else:
            del self.need[disk]
        return self.done

    def asks(self) -> Dict[int, List[Tuple[int, int]]]:
        """What is still uncovered, as (offset, length) ranges per disk."""
        return {d: [(s, e - s) for s, e in r] for d, r in self.need.items()}


@dataclass
class Classified:
    """What ``classify`` found: the records that hold (position, end), the damage, and
    where a torn tail starts (None: nothing to cut)."""
    records: List[Tuple[int, int]]
    damage: List[Tuple[int, int]]
    missing: int
    cut: Optional[int]


def classify(raw: bytes, decode: Decode, acked: Optional[int]) -> Classified:
    """Sort a segment's bytes into records, damage and a torn tail (see the module).
    ``acked`` is the segment's acked end when known."""
    buf = memoryview(raw)
    records: List[Tuple[int, int]] = []
    damage: List[Tuple[int, int]] = []
    pos, cut = 0, None
    while pos < len(buf):
        after = decode(buf, pos)
        if after is not None:
            records.append((pos, after))
            pos = after
            continue
        nxt = next_record(raw, decode, pos + 1)
        if nxt is not None:
            damage.append((pos, nxt))
            pos = nxt
            continue
        if acked is None or pos >= acked:
            cut = pos
        elif acked < len(buf):
            damage.append((pos, acked))  # acked, failing
            cut = acked                  # after it: never acked
        else:
            damage.append((pos, len(buf)))
        break
    missing = max(0, acked - len(buf)) if acked is not None else 0
    if missing and not (damage and damage[-1][1] == len(buf)):
        damage.append((len(buf), len(buf)))
    return Classified(records, damage, missing, cut)


def next_record(raw: bytes, decode: Decode, start: int) -> Optional[int]:
    """The position of the first record at or after ``start`` that holds, or None."""
    buf = memoryview(raw)
    pos = raw.find(MAGIC, start)
    while pos >= 0:
        if decode(buf, pos) is not None:
            return pos
        pos = raw.find(MAGIC, pos + 1)
    return None


def header_range(buf: memoryview, start: int, end: int) -> Optional[Tuple[int, int, int]]:
    """(disk, offset, length) from a failing record's header when it still fits its place
    (its magic and kind hold, it is a disk's record, and it ends exactly where the next
    record starts)."""
    if start + RECORD.size > len(buf):
        return None
    magic, kind, _f, disk, _g, length, _s, offset, _t, _c = RECORD.unpack_from(buf, start)
    if magic != MAGIC or kind not in JOURNAL_KINDS or kind >= KIND_CHECKPOINT:
        return None  # not a record of a disk (a group marker), or no header at all
    if start + RECORD.size + (length if kind in DATA_KINDS else 0) != end:
        return None
    return disk, offset, length


# -- the acked mark ----------------------------------------------------------------------------

_MARK = struct.Struct("<4sQQI")
_MARK_MAGIC = b"FJA\x01"


class AckedMark:
    """``journal/acked``: (segment, end) of the last acked append (see the module)."""

    def __init__(self, directory: str) -> None:
        self.path = os.path.join(directory, "acked")
        self.failed = 0  # writes that failed (the mark stayed older)
        self._fd = -1

    def read(self) -> Optional[Tuple[int, int]]:
        try:
            with open(self.path, "rb") as f:
                raw = f.read(_MARK.size)
        except OSError:  # none, or unreadable: the structure alone decides
            return None
        if len(raw) != _MARK.size:
            return None
        magic, segno, end, crc = _MARK.unpack(raw)
        if magic != _MARK_MAGIC or crc != zlib.crc32(raw[:-4]):
            return None
        return segno, end

    def write(self, segno: int, end: int) -> None:
        """Not synced: written after the segment's fdatasync, it never says more than that.
        A mark that cannot be written stays older, still a lower bound: the batch it would
        have marked is durable and acked all the same, so an error here is not raised."""
        try:
            if self._fd < 0:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC
                                   | os.O_NOFOLLOW, 0o600)
            body = _MARK.pack(_MARK_MAGIC, segno, end, 0)[:-4]
            os.pwrite(self._fd, body + struct.pack("<I", zlib.crc32(body)), 0)
        except OSError:
            self.failed += 1

    def close(self, sync: bool = False) -> None:
        if self._fd >= 0:
            if sync:
                os.fdatasync(self._fd)
            os.close(self._fd)
            self._fd = -1


# -- damage.json -------------------------------------------------------------------------------

def path(directory: str) -> str:
    return os.path.join(directory, "damage.json")


def load(directory: str) -> List[Damage]:
    """The damage found before (``journal/damage.json``); a file that does not parse is
    a StorageError-worthy fault the caller names."""
    try:
        with open(path(directory), "rb") as f:
            raw = json.loads(f.read())
    except FileNotFoundError:
        return []
    return [Damage(**d) for d in raw["damage"]]


def save(directory: str, damage: List[Damage]) -> None:
    """Replace ``damage.json``; durable when it returns."""
    write_atomic(path(directory), json.dumps(
        {"damage": [d.to_json() for d in damage]}, indent=1, sort_keys=True).encode())
