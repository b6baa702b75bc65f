"""The point-in-time map: a disk as it was at a point, from its replica and journal segments.

Standard library only, Python 3.9: the view plugin (``nbd_plugin/view.py``, inside nbdkit's
embedded Python) serves views with it, and the agent's tests and benchmarks use it. It reads
the segment indexes of ``jindex.py`` and builds nothing per record (see ``JournalMap``).

**What a Reader vouches for.** Journal data is returned only from a record whose checksum
(xxh3_64 of header bytes 0..39 and the data, ``segment.py``) holds, checked the first time
the record is read, and never from a record inside damage the agent found (the spec's
``damage``); otherwise the read raises ``RecordCorrupt`` (an ``OSError``, EIO) naming the
group, disk, segment file and offset. xxh3 is not in the standard library: ``hasher`` finds
the ``xxhash`` module where the Python running the plugin has it, or where the agent's
Python has it (the spec's ``xxhash_path``, used only when its compiled module fits this
Python). Where neither is importable the Reader cannot check checksums itself: it still
refuses the damage the agent knows (found at open by checking every record the replicas
lack, or by a checked read) and ``Reader.verified`` is False (the plugin says so in its log).
"""

from __future__ import annotations

import bisect
import errno
import importlib
import os
import struct
import sys
from array import array
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from . import reads
from .jindex import (
    BLOCK_SHIFT,
    DISK_SHIFT,
    ENTRY,
    RECORD,
    Point,
    SegmentIndex,
    idx_path,
    index_entries,
    load_index,
    scan_headers,
)
from .records import DATA_KINDS, KIND_WRITE
from .segment import CHECKED

# A piece's source: (segment number, byte position of its data in the segment), or ZERO.
Source = Tuple[int, int]
ZERO: Source = (-1, 0)
SPECULATE = 64 * 1024  # a record's first read takes this much data with its header


class JournalMap:
    """Newest-wins view of one disk's records between two points, over segment indexes.

    Nothing is decoded per record when the map is built: each segment's pieces are sorted
    by block already, so ``seal`` only merges the disk's keys of every segment into one
    sorted list of ints (``block << 56 | rank << 32 | ~entry``, the newest segment having
    rank 0): about 0.2 us a piece, in C mostly. A read then bisects that list once, takes
    the records over its blocks newest first, and stops as soon as every byte asked for is
    covered; what no record covers comes from the replica. Records count when they are of
    ``disk``, their ``(gen, seq)`` is in ``(base, upto]``, and they lie at or after
    ``start`` (the replica's journal position) and before each segment's ``end``.
    """

    def __init__(self, disk: int, base: Point, upto: Point, start: Tuple[int, int] = (0, 0)
                 ) -> None:
        self.disk = disk
        self.base = base
        self.upto = upto
        self.start = start
        # Oldest first until sealed: (segment number, index, first position, end position).
        self._added: List[Tuple[int, SegmentIndex, int, int]] = []
        # Sealed, newest first: (segment number, its entries, first position, end position).
        self._parts: List[Tuple[int, bytes, int, int]] = []
        self._merged: Optional[List[int]] = None

    def add_segment(self, segno: int, ix: SegmentIndex, end: int) -> None:
        """Add the next segment (oldest first), of which the map sees ``end`` bytes."""
        assert self._merged is None, "the map is sealed"
        span = ix.spans.get(self.disk)
        if span is None or span[1] <= self.base or span[0] > self.upto:
            return  # no record of the disk in the window
        if segno < self.start[0]:
            return
        floor = self.start[1] if segno == self.start[0] else 0
        self._added.append((segno, ix, floor, end))

    def seal(self) -> None:
        """Merge the segments' keys (done by the first lookup if not called before)."""
        if self._merged is not None:
            return
        if len(self._added) >= 1 << 24:
            raise ValueError("a view of more than 16,777,216 segments")
        lo_key, hi_key = self.disk << DISK_SHIFT, (self.disk + 1) << DISK_SHIFT
        merged: List[int] = []
        parts = []
        for rank, (segno, ix, floor, end) in enumerate(reversed(self._added)):
            lo = bisect.bisect_left(ix.keys, lo_key)
            hi = bisect.bisect_left(ix.keys, hi_key, lo)
            tag = rank << 32 | _ENTRY_MASK
            merged += [(k - lo_key) << 56 | (tag - ref)
                       for k, ref in zip(ix.keys[lo:hi], ix.refs[lo:hi])]
            parts.append((segno, ix.entries, floor, end))
        merged.sort()
        self._parts = parts
        self._added = []
        self._merged = merged

    def record_starts(self, segno: int) -> Sequence[int]:
        """The header positions of a sealed map's segment's records, ascending."""
        for n, entries, _floor, _end in self._parts:
            if n == segno:
                return array("Q", [e[8] for e in ENTRY.iter_unpack(entries)])
        return array("Q")

    def pieces(self) -> int:
        self.seal()
        assert self._merged is not None
        return len(self._merged)

    @property
    def segments(self) -> int:
        return len(self._parts) if self._merged is not None else len(self._added)

    def lookup(self, offset: int, length: int) -> List[Tuple[int, int, Optional[Source]]]:
        """Cover [offset, offset+length) with (start, end, source) in order; a source of
        None means the replica."""
        merged = self._merged
        if merged is None:
            self.seal()
            merged = self._merged
            assert merged is not None
        end = offset + length
        # What no record covers yet: disjoint, in order.
        starts, ends = [offset], [end]
        out: List[Tuple[int, int, Optional[Source]]] = []
        lo = bisect.bisect_left(merged, (offset >> BLOCK_SHIFT) << 56)
        hi = bisect.bisect_left(merged, (((end - 1) >> BLOCK_SHIFT) + 1) << 56, lo)
        if hi - lo == 1:
            cands = [merged[lo] & _TAG_MASK]
        else:
            # Newest first (rank, then entry, both inverted in the tag), each record once
            # (a record over several blocks has a key in each).
            cands = sorted({c & _TAG_MASK for c in merged[lo:hi]})
        parts = self._parts
        base, upto = self.base, self.upto
        unpack = ENTRY.unpack_from
        for tag in cands:
            segno, entries, floor, limit = parts[tag >> 32]
            ref = _ENTRY_MASK - (tag & _ENTRY_MASK)
            _d, kind, _f, gen, n, seq, roff, _t, rpos = unpack(entries, ref * ENTRY.size)
            rend = roff + n
            i = bisect.bisect_right(ends, roff)
            if i == len(starts) or starts[i] >= rend:
                continue  # covers nothing left
            if rpos < floor or rpos >= limit or not base < (gen, seq) <= upto:
                continue
            j = i
            new_starts: List[int] = []
            new_ends: List[int] = []
            while j < len(starts) and starts[j] < rend:
                a, b = starts[j], ends[j]
                if a < roff:
                    new_starts.append(a)
                    new_ends.append(roff)
                    a = roff
                e = b if b < rend else rend
                out.append((a, e, (segno, rpos + RECORD.size + a - roff)
                            if kind == KIND_WRITE else ZERO))
                if rend < b:
                    new_starts.append(rend)
                    new_ends.append(b)
                j += 1
            starts[i:j] = new_starts
            ends[i:j] = new_ends
            if not starts:
                break
        out.extend(zip(starts, ends, [None] * len(starts)))
        out.sort(key=_start_of)
        merged_out: List[Tuple[int, int, Optional[Source]]] = []
        for piece in out:
            if merged_out and _continues(merged_out[-1], piece[0], piece[2]):
                merged_out[-1] = (merged_out[-1][0], piece[1], merged_out[-1][2])
            else:
                merged_out.append(piece)
        return merged_out


_ENTRY_MASK = 0xFFFFFFFF
_TAG_MASK = (1 << 56) - 1


def _start_of(piece: Tuple[int, int, Optional[Source]]) -> int:
    return piece[0]


def _continues(prev: Tuple[int, int, Optional[Source]], at: int,
               src: Optional[Source]) -> bool:
    if prev[1] != at:
        return False
    psrc = prev[2]
    if psrc is None or src is None:
        return psrc is None and src is None
    if psrc is ZERO or src is ZERO:
        return psrc is ZERO and src is ZERO
    return psrc[0] == src[0] and psrc[1] + (at - prev[0]) == src[1]


class RecordCorrupt(OSError):
    """A journal record a read needs fails its checksum or lies in known damage (EIO)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)

    def __str__(self) -> str:
        return str(self.strerror)


class ReadFailed(OSError):
    """A read of the replica or a segment failed (its errno kept); the message is one line
    naming the group, the disk, the file and the byte."""

    def __str__(self) -> str:
        return str(self.strerror)


Hasher = Callable[[Any], Any]  # xxhash.xxh3_64


def hasher(path: Optional[str] = None) -> Optional[Hasher]:
    """``xxhash.xxh3_64`` from this Python, else from ``path`` (the agent's site-packages),
    else None (see the module)."""
    try:
        return importlib.import_module("xxhash").xxh3_64
    except ImportError:
        pass
    if not path or not os.path.isdir(path):
        return None
    sys.path.append(path)
    try:
        return importlib.import_module("xxhash").xxh3_64
    except ImportError:  # built for another Python
        return None
    finally:
        sys.path.remove(path)


class Reader:
    """Reads a disk through a ``JournalMap``: replica file plus journal segments.

    Replica and segments are read with ``preadv`` on descriptors opened once (not mapped:
    a read error of a mapped file is a SIGBUS that kills the process; a failed read here is
    an ``OSError`` naming the file and the byte, ``formats/reads.py``, and nothing read is
    returned). A segment must not shrink under the view: the agent pins the group (no
    promotion, no deletion) and only ever cuts an open segment back to a size at or past
    the one the view saw. Every record is checked before its data is first returned (see
    the module): ``check`` is the hash to check with (None: only ``damage``, ``{segment:
    [(start, end)]}``, is refused)."""

    def __init__(self, replica: str, segments: List[Tuple[int, str, int]], jmap: JournalMap,
                 check: Optional[Hasher] = None,
                 damage: Optional[Dict[int, List[Tuple[int, int]]]] = None,
                 label: str = "a view") -> None:
        self._replica_path = replica
        self._replica = os.open(replica, os.O_RDONLY | os.O_CLOEXEC)
        self._fds: Dict[int, int] = {}
        self._ends: Dict[int, int] = {}
        self._paths = {segno: path for segno, path, _end in segments}
        self._check = check
        self._damage = damage or {}
        self._label = label
        self._starts: Dict[int, Sequence[int]] = {}  # segment -> its records' positions
        self._good: Dict[int, bytearray] = {}        # segment -> 1 per record checked
        try:
            for segno, path, end in segments:
                if end <= 0:
                    continue
                self._fds[segno] = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                self._ends[segno] = end
        except BaseException:
            self.close()
            raise
        self.map = jmap

    @property
    def verified(self) -> bool:
        """Are record checksums checked (not only the damage the agent knows)?"""
        return self._check is not None

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buf: bytearray | memoryview, offset: int) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset``; RecordCorrupt if a record it
        needs cannot be vouched for, an ``OSError`` naming file and byte if a read fails."""
        view = memoryview(buf)
        for s, e, src in self.map.lookup(offset, len(view)):
            part = view[s - offset:e - offset]
            if src is ZERO:
                part[:] = bytes(e - s)
            elif src is not None:
                got = self._vouch(src[0], src[1])
                at = src[1] - got[0] if got is not None else -1
                if got is not None and at + (e - s) <= len(got[1]):
                    part[:] = got[1][at:at + e - s]
                else:
                    self._fill(self._fds[src[0]], self._paths.get(src[0], str(src[0])), part,
                               src[1], False)
            else:
                self._fill(self._replica, self._replica_path, part, s, True)

    def _label_of(self, e: OSError) -> ReadFailed:
        return ReadFailed(e.errno or errno.EIO, "%s: %s" % (self._label, reads.one_line(e)),
                          e.filename)

    def _fill(self, fd: int, path: str, part: memoryview, at: int, sparse: bool) -> None:
        """Read ``part`` from ``fd`` at ``at``; past the end of a replica (``sparse``)
        reads zeroes, past the end of a segment is an error."""
        start, want = at, len(part)
        while part:
            try:
                got = os.preadv(fd, [part], at)
            except OSError as e:
                raise self._label_of(reads.failed(e, start, want, path)) from None
            if got == 0:
                if sparse:  # a replica shorter than the disk reads zeroes
                    part[:] = bytes(len(part))
                    return
                raise self._label_of(reads.failed(OSError(errno.EIO, "the file ended early"),
                                                  start, want, path))
            part, at = part[got:], at + got

    def _vouch(self, segno: int, data_pos: int) -> Optional[Tuple[int, memoryview]]:
        """Check the record whose data holds byte ``data_pos`` of segment ``segno``; the
        record's position and bytes when it was read now to be checked (the caller copies
        from them: one system call for a record's first read), else None."""
        starts = self._starts.get(segno)
        if starts is None:
            starts = self._starts[segno] = self.map.record_starts(segno)
            self._good[segno] = bytearray(len(starts))
        n = bisect.bisect_right(starts, data_pos - RECORD.size) - 1
        rpos = starts[n]
        good = self._good[segno]
        if good[n]:
            return None
        for start, end in self._damage.get(segno, ()):
            if start <= rpos < end:
                raise self._corrupt(segno, rpos, "lies in damage site B found")
        rec = None
        if self._check is not None:
            path = self._paths.get(segno, str(segno))
            limit = self._ends[segno]
            if rpos + RECORD.size > limit:
                raise self._corrupt(segno, rpos, "fails its checksum")
            # The header and, most often, the whole record in one read.
            buf = bytearray(min(limit, rpos + RECORD.size + SPECULATE) - rpos)
            self._fill(self._fds[segno], path, memoryview(buf), rpos, False)
            kind, length = buf[4], struct.unpack_from("<I", buf, 12)[0]
            end = rpos + RECORD.size + (length if kind in DATA_KINDS else 0)
            if end > limit:
                raise self._corrupt(segno, rpos, "fails its checksum")
            if end > rpos + len(buf):
                more = bytearray(end - rpos - len(buf))
                self._fill(self._fds[segno], path, memoryview(more), rpos + len(buf), False)
                buf += more
            rec = memoryview(buf)[:end - rpos]
            h = self._check(rec[:CHECKED])
            h.update(rec[RECORD.size:])
            if h.intdigest() != struct.unpack_from("<Q", rec, CHECKED)[0]:
                raise self._corrupt(segno, rpos, "fails its checksum")
        good[n] = 1
        return None if rec is None else (rpos, rec)

    def _corrupt(self, segno: int, rpos: int, why: str) -> RecordCorrupt:
        return RecordCorrupt("%s: journal segment %s: the record at byte %d %s"
                             % (self._label, self._paths.get(segno, segno), rpos, why))

    def close(self) -> None:
        if self._replica >= 0:
            os.close(self._replica)
            self._replica = -1
        for fd in self._fds.values():
            os.close(fd)
        self._fds = {}

def build_map(spec: Dict) -> JournalMap:
    """The map of one disk of a view (the spec ``TargetGroup.view_spec`` makes): the disk's
    records after the replica's point ``base`` up to ``upto``. Each segment's index is one
    file read: its index file, else the snapshot the agent wrote for the view (``indexes``:
    the open segment), else (neither holds) its record headers, scanned and sorted here."""
    jmap = JournalMap(spec["disk"], tuple(spec["base"]), tuple(spec["upto"]),
                      tuple(spec["start"]))
    extra = spec.get("indexes", {})
    for segno, path, end in spec["segments"]:
        ix = load_index(idx_path(path), end)
        if ix is None and str(segno) in extra:
            ix = load_index(extra[str(segno)], end)
        if ix is None:
            ix = index_entries(scan_headers(path, end))
        jmap.add_segment(segno, ix, end)
    jmap.seal()
    return jmap


def open_reader(spec: Dict, find: Callable[[Optional[str]], Optional[Hasher]] = hasher
                ) -> Reader:
    """The reader of a view's spec, checking records with what ``find`` finds."""
    damage: Dict[int, List[Tuple[int, int]]] = {}
    for segno, start, end in spec.get("damage", []):
        damage.setdefault(segno, []).append((start, end))
    check = find(spec.get("xxhash_path"))
    label = "group %s, disk %s" % (spec.get("group", "?"), spec.get("name", spec["disk"]))
    return Reader(spec["replica"], [(n, p, end) for n, p, end in spec["segments"]],
                  build_map(spec), check, damage, label)
