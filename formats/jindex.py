"""The journal's index and the view's map: where the newest version of a block is, at a point.

Standard library only, Python 3.9: the agent and the view plugin (which runs inside nbdkit's
embedded Python) both use it.

Every record of a journal segment has one index entry (44 bytes, little-endian)::

    offset  size  field
    0       2     disk      index of the disk in its group
    2       1     kind      localwire.KIND_*, or KIND_CHECKPOINT / KIND_FAILOVER below
    3       1     flags     localwire.FLAG_*
    4       4     gen       splitter generation
    8       4     length
    12      8     seq
    20      8     offset    byte offset on the disk
    28      8     time_ns   source CLOCK_MONOTONIC
    36      8     pos       byte position of the record's 48-byte header in the segment

When a segment is closed, its index file ``seg-<n>.idx`` is written beside it (version 2)::

    entries     N x 44   the entries above, in record order
    keys        M x 8    u64 ``disk << 48 | block`` of every piece (below), sorted; pieces
                         of one block keep record order
    refs        M x 4    u32 the entry number of each piece
    spans       D x 32   per disk with pieces: disk u32, first gen u32, first seq u64,
                         last gen u32, reserved u32, last seq u64
    counts      16       N u32, M u32, D u32, block shift u32 (12: the keys' block size)
    trailer     16       magic b"FJX\x02", crc32 (zlib) of every byte before the magic,
                         covers u64 (the segment's size in bytes when the index was written)

A *piece* is a write, zero or trim record of non-zero length cut at ``BLOCK`` (4 KiB)
boundaries: an aligned record of 4 KiB has one, a record of 4 MiB has 1,024 (12 bytes each,
0.3 % of the data). With the keys sorted, the
pieces of a block are found by bisection, which is what lets a point-in-time view open with
one read per segment, nothing decoded per record, and one merge of sorted lists
(``JournalMap``).

Version 1 (written before the keys existed) is the entries followed by the trailer alone,
with magic b"FJX\x01" and the crc32 of the entries. It is still read: the agent rewrites
it as version 2 when it opens the journal, and the view plugin builds the keys in memory.

An index file that is missing, short, or fails its crc is not used: the agent rebuilds it
from the segment (checking every record's checksum), the view plugin scans the segment's
record headers.
"""

from __future__ import annotations

import bisect
import mmap
import os
import struct
import sys
import zlib
from array import array
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

from .records import (  # noqa: F401
    DATA_KINDS,
    KIND_CHECKPOINT,
    KIND_FAILOVER,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
    MAP_KINDS,
)
from .segment import MAGIC as RECORD_MAGIC
from .segment import RECORD

ENTRY = struct.Struct("<HBBIIQQQQ")
assert ENTRY.size == 44
TRAILER = struct.Struct("<4sIQ")
assert TRAILER.size == 16
COUNTS = struct.Struct("<IIII")
assert COUNTS.size == 16
SPAN = struct.Struct("<IIQIIQ")
assert SPAN.size == 32
IDX_MAGIC_V1 = b"FJX\x01"
IDX_MAGIC = b"FJX\x02"


BLOCK_SHIFT = 12
BLOCK = 1 << BLOCK_SHIFT  # map granularity: a piece never crosses a BLOCK boundary
DISK_SHIFT = 48           # key = disk << DISK_SHIFT | block

Point = Tuple[int, int]   # (gen, seq)


# A piece's source: (segment number, byte position of its data in the segment), or ZERO.
Source = Tuple[int, int]
ZERO: Source = (-1, 0)


class SegmentIndex(NamedTuple):
    """One segment's index: its entries, and its pieces sorted by block."""
    entries: bytes
    keys: List[int]     # u64, sorted (a list: bisect on it is twice as fast as on an array)
    refs: array[int]    # u32 entry numbers, parallel to keys
    spans: Dict[int, Tuple[Point, Point]]  # disk -> (first, last) (gen, seq) with pieces


def _array(code: str, buf: bytes | memoryview) -> array[int]:
    a = array(code)
    a.frombytes(buf)
    if sys.byteorder != "little":
        a.byteswap()
    return a


def _raw(a: array[int]) -> bytes:
    if sys.byteorder != "little":
        a = array(a.typecode, a)
        a.byteswap()
    return a.tobytes()


assert array("Q").itemsize == 8 and array("I").itemsize == 4


def index_entries(entries: bytes) -> SegmentIndex:
    """Sort a segment's pieces by block (about 1 us a record, in Python: done once, when
    the segment is closed)."""
    pairs = []
    spans: Dict[int, List[int]] = {}
    i = -1
    for disk, kind, _f, gen, length, seq, offset, _t, _p in ENTRY.iter_unpack(entries):
        i += 1
        if not length or kind not in MAP_KINDS:
            continue
        span = spans.get(disk)
        if span is None:
            spans[disk] = [gen, seq, gen, seq]
        else:
            span[2] = gen
            span[3] = seq
        first = offset >> BLOCK_SHIFT
        last = (offset + length - 1) >> BLOCK_SHIFT
        base = disk << DISK_SHIFT
        if first == last:
            pairs.append((base | first) << 32 | i)
        else:
            pairs.extend((base | b) << 32 | i for b in range(first, last + 1))
    pairs.sort()  # by key, then entry number: record order within a block
    keys = [p >> 32 for p in pairs]
    refs = array("I", [p & 0xFFFFFFFF for p in pairs])
    return SegmentIndex(bytes(entries), keys, refs,
                        {d: ((s[0], s[1]), (s[2], s[3])) for d, s in spans.items()})


def pack_idx(entries: bytes, covers: int) -> bytes:
    """An index file (version 2) for a segment of ``covers`` bytes."""
    return pack_index(index_entries(entries), covers)


def pack_index(ix: SegmentIndex, covers: int) -> bytes:
    spans = b"".join(SPAN.pack(d, f[0], f[1], last[0], 0, last[1])
                     for d, (f, last) in sorted(ix.spans.items()))
    body = b"".join([ix.entries, _raw(array("Q", ix.keys)), _raw(ix.refs), spans,
                     COUNTS.pack(len(ix.entries) // ENTRY.size, len(ix.keys), len(ix.spans),
                                 BLOCK_SHIFT)])
    return body + TRAILER.pack(IDX_MAGIC, zlib.crc32(body), covers)


def unpack_index(buf: bytes, covers: int) -> Optional[Tuple[SegmentIndex, int]]:
    """An index file's contents and its version, or None when it does not hold for a
    segment of ``covers`` bytes. A version 1 file gets its keys built here."""
    entries = _entries_v1(buf, covers)
    if entries is not None:
        return index_entries(entries), 1
    parts = _split_v2(buf, covers)
    if parts is None:
        return None
    raw, keys, refs, spans = parts
    if _shift_v2(buf) != BLOCK_SHIFT:  # keys of another block size: sort them again
        return index_entries(bytes(raw)), 2
    table = {}
    for d, fg, fs, lg, _r, ls in SPAN.iter_unpack(spans):
        table[d] = ((fg, fs), (lg, ls))
    return SegmentIndex(bytes(raw), _array("Q", keys).tolist(), _array("I", refs), table), 2


def unpack_idx(buf: bytes, covers: int) -> Optional[bytes]:
    """The entries of an index file (either version), or None when it does not hold for a
    segment of ``covers`` bytes."""
    entries = _entries_v1(buf, covers)
    if entries is not None:
        return entries
    parts = _split_v2(buf, covers)
    return None if parts is None else bytes(parts[0])


def idx_version(buf: bytes) -> int:
    """1 or 2 by the trailer's magic (0 for neither); says nothing about whether it holds."""
    magic = buf[-TRAILER.size:][:4] if len(buf) >= TRAILER.size else b""
    return {IDX_MAGIC_V1: 1, IDX_MAGIC: 2}.get(bytes(magic), 0)


def idx_current(buf: bytes) -> bool:
    """Version 2 with keys of this ``BLOCK_SHIFT`` (the file may still not hold)."""
    return idx_version(buf) == 2 and len(buf) >= COUNTS.size + TRAILER.size \
        and _shift_v2(buf) == BLOCK_SHIFT


def _entries_v1(buf: bytes, covers: int) -> Optional[bytes]:
    if len(buf) < TRAILER.size or (len(buf) - TRAILER.size) % ENTRY.size:
        return None
    magic, crc, size = TRAILER.unpack_from(buf, len(buf) - TRAILER.size)
    if magic != IDX_MAGIC_V1 or size != covers:
        return None
    entries = bytes(buf[:-TRAILER.size])
    return entries if crc == zlib.crc32(entries) else None


def _shift_v2(buf: bytes) -> int:
    return int(COUNTS.unpack_from(buf, len(buf) - COUNTS.size - TRAILER.size)[3])


def _split_v2(buf: bytes, covers: int) -> Optional[Tuple[memoryview, ...]]:
    tail = COUNTS.size + TRAILER.size
    if len(buf) < tail:
        return None
    magic, crc, size = TRAILER.unpack_from(buf, len(buf) - TRAILER.size)
    if magic != IDX_MAGIC or size != covers:
        return None
    n, m, d, _shift = COUNTS.unpack_from(buf, len(buf) - tail)
    if n * ENTRY.size + m * 12 + d * SPAN.size + tail != len(buf):
        return None
    view = memoryview(buf)
    if crc != zlib.crc32(view[:len(buf) - TRAILER.size]):
        return None
    a = n * ENTRY.size
    b = a + m * 8
    c = b + m * 4
    return view[:a], view[a:b], view[b:c], view[c:c + d * SPAN.size]


def idx_path(segment_path: str) -> str:
    return segment_path[:-len(".fjr")] + ".idx"


def read_idx(segment_path: str, covers: int) -> Optional[bytes]:
    try:
        with open(idx_path(segment_path), "rb") as f:
            return unpack_idx(f.read(), covers)
    except FileNotFoundError:
        return None


def load_index(path: str, covers: int) -> Optional[SegmentIndex]:
    """The index file at ``path`` for a segment of ``covers`` bytes, or None."""
    try:
        with open(path, "rb") as f:
            got = unpack_index(f.read(), covers)
    except FileNotFoundError:
        return None
    return None if got is None else got[0]


def scan_headers(segment_path: str, end: int) -> bytes:
    """Index entries from a segment's record headers up to byte ``end``, without checksums:
    for a reader of records the agent has already checked."""
    out = bytearray()
    with open(segment_path, "rb") as f:
        pos = 0
        while pos + RECORD.size <= end:
            f.seek(pos)
            head = f.read(RECORD.size)
            if len(head) < RECORD.size:
                break
            magic, kind, flags, disk, gen, length, seq, offset, time_ns, _ = RECORD.unpack(head)
            if magic != RECORD_MAGIC:
                raise ValueError("%s: no record at byte %d" % (segment_path, pos))
            out += ENTRY.pack(disk, kind, flags, gen, length, seq, offset, time_ns, pos)
            pos += RECORD.size + (length if kind in DATA_KINDS else 0)
    return bytes(out)


def entries(buf: bytes) -> Iterator[Tuple[int, int, int, int, int, int, int, int, int]]:
    """(disk, kind, flags, gen, length, seq, offset, time_ns, pos) of each entry."""
    return ENTRY.iter_unpack(buf)


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


class Reader:
    """Reads a disk through a ``JournalMap``: replica file plus journal segments.

    Each segment is mapped read-only (``mmap``, the ``end`` bytes the view sees), so the
    pieces of a read are copied from the page cache without a system call each; the
    replica is read with ``preadv``. A mapped segment must not shrink under the view:
    the agent pins the group (no promotion, no deletion) and only ever cuts an open
    segment back to a size at or past the one the view saw."""

    def __init__(self, replica: str, segments: List[Tuple[int, str, int]], jmap: JournalMap
                 ) -> None:
        self._replica = os.open(replica, os.O_RDONLY | os.O_CLOEXEC)
        self._maps: Dict[int, mmap.mmap] = {}
        self._views: Dict[int, memoryview] = {}
        try:
            for segno, path, end in segments:
                if end <= 0:
                    continue
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    self._maps[segno] = mmap.mmap(fd, end, prot=mmap.PROT_READ)
                finally:
                    os.close(fd)
                self._views[segno] = memoryview(self._maps[segno])
        except BaseException:
            self.close()
            raise
        self.map = jmap

    def pread(self, length: int, offset: int) -> bytes:
        buf = bytearray(length)
        self.readinto(buf, offset)
        return bytes(buf)

    def readinto(self, buf: bytearray | memoryview, offset: int) -> None:
        """Fill ``buf`` with the disk's bytes at ``offset``."""
        view = memoryview(buf)
        for s, e, src in self.map.lookup(offset, len(view)):
            part = view[s - offset:e - offset]
            if src is ZERO:
                part[:] = bytes(e - s)
            elif src is not None:
                part[:] = self._views[src[0]][src[1]:src[1] + e - s]
            else:
                at = s
                while part:
                    got = os.preadv(self._replica, [part], at)
                    if got == 0:  # a replica shorter than the disk reads zeroes
                        part[:] = bytes(len(part))
                        break
                    part, at = part[got:], at + got

    def close(self) -> None:
        if self._replica >= 0:
            os.close(self._replica)
            self._replica = -1
        for v in self._views.values():
            v.release()
        for m in self._maps.values():
            m.close()
        self._views = {}
        self._maps = {}


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


def open_reader(spec: Dict) -> Reader:
    return Reader(spec["replica"], [(n, p, end) for n, p, end in spec["segments"]],
                  build_map(spec))
