"""The journal's index and extent map: where the newest version of a block is, at a point.

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

When a segment is closed, its entries are written to ``seg-<n>.idx`` beside it, followed
by a 16-byte trailer::

    0   4   magic       b"FJX\\x01"
    4   4   crc32       zlib.crc32 of all the entries
    8   8   covers      the segment's size in bytes when the index was written

An index file that is missing, short, or fails its crc is not used: the agent rebuilds it
from the segment (checking every record's checksum), the view plugin scans the segment's
record headers.

An ``ExtentMap`` answers, for a byte range of one disk, which pieces come from which
journal record and which from the replica: it is fed the records of that disk that lie
between the replica's point and the chosen point, in journal order.
"""

from __future__ import annotations

import bisect
import os
import struct
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

ENTRY = struct.Struct("<HBBIIQQQQ")
assert ENTRY.size == 44
TRAILER = struct.Struct("<4sIQ")
assert TRAILER.size == 16
IDX_MAGIC = b"FJX\x01"

# The journal record header (agent/journal.py documents it; only its shape is needed here).
RECORD = struct.Struct("<4sBBHIIQQQQ")
assert RECORD.size == 48
RECORD_MAGIC = b"FJR\x01"

KIND_WRITE = 1
KIND_ZERO = 2
KIND_TRIM = 3
KIND_CHECKPOINT = 64   # journal only: a group checkpoint; data is a JSON object
KIND_FAILOVER = 65     # journal only: the group failed over live; data is a JSON object
DATA_KINDS = (KIND_WRITE, KIND_CHECKPOINT, KIND_FAILOVER)

BLOCK = 64 * 1024      # extent map granularity: a piece never crosses a BLOCK boundary


def idx_path(segment_path: str) -> str:
    return segment_path[:-len(".fjr")] + ".idx"


def pack_idx(entries: bytes, covers: int) -> bytes:
    return entries + TRAILER.pack(IDX_MAGIC, zlib.crc32(entries), covers)


def unpack_idx(buf: bytes, covers: int) -> Optional[bytes]:
    """The entries of an index file, or None when it does not hold for a segment of
    ``covers`` bytes."""
    if len(buf) < TRAILER.size or (len(buf) - TRAILER.size) % ENTRY.size:
        return None
    entries = buf[:-TRAILER.size]
    magic, crc, size = TRAILER.unpack_from(buf, len(buf) - TRAILER.size)
    if magic != IDX_MAGIC or crc != zlib.crc32(entries) or size != covers:
        return None
    return entries


def read_idx(segment_path: str, covers: int) -> Optional[bytes]:
    try:
        with open(idx_path(segment_path), "rb") as f:
            return unpack_idx(f.read(), covers)
    except FileNotFoundError:
        return None


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


# A piece's source: (segment number, byte position of its data in the segment), or ZERO.
Source = Tuple[int, int]
ZERO: Source = (-1, 0)


class ExtentMap:
    """Newest-wins map of byte ranges of one disk to journal data, zeroes or the replica.

    Records are added in journal order. Each is cut at BLOCK boundaries; each block keeps
    its pieces oldest first. When a block's list doubles, the pieces newer ones cover
    whole are dropped, so a block written many times over stays small (amortized)."""

    def __init__(self) -> None:
        self._blocks: Dict[int, List[Tuple[int, int, Source]]] = {}
        self._prune_at: Dict[int, int] = {}
        self.records = 0

    def add(self, offset: int, length: int, source: Source) -> None:
        self.records += 1
        end = offset + length
        blocks = self._blocks
        while offset < end:
            block = offset // BLOCK
            stop = min(end, (block + 1) * BLOCK)
            pieces = blocks.get(block)
            if pieces is None:
                blocks[block] = [(offset, stop, source)]
            else:
                pieces.append((offset, stop, source))
                if len(pieces) >= self._prune_at.get(block, PRUNE_MIN):
                    pieces[:] = _prune(pieces)
                    self._prune_at[block] = max(PRUNE_MIN, 2 * len(pieces))
            if source is not ZERO:
                source = (source[0], source[1] + (stop - offset))
            offset = stop

    def pieces(self) -> int:
        return sum(len(p) for p in self._blocks.values())

    def lookup(self, offset: int, length: int) -> List[Tuple[int, int, Optional[Source]]]:
        """Cover [offset, offset+length) with (start, end, source) in order; a source of
        None means the replica."""
        out: List[Tuple[int, int, Optional[Source]]] = []
        end = offset + length
        pos = offset
        while pos < end:
            block = pos // BLOCK
            stop = min(end, (block + 1) * BLOCK)
            pieces = self._blocks.get(block)
            if not pieces:
                out.append((pos, stop, None))
            else:
                out.extend(_paint(pos, stop, pieces))
            pos = stop
        return out

    def blocks(self) -> List[int]:
        return sorted(self._blocks)


PRUNE_MIN = 16


def _prune(pieces: List[Tuple[int, int, Source]]) -> List[Tuple[int, int, Source]]:
    """The pieces (oldest first) without those the newer ones cover whole."""
    covered: List[Tuple[int, int]] = []  # merged, sorted by start
    keep = []
    for piece in reversed(pieces):
        s, e = piece[0], piece[1]
        i = bisect.bisect_right(covered, (s, 1 << 62)) - 1
        if i >= 0 and covered[i][0] <= s and e <= covered[i][1]:
            continue
        keep.append(piece)
        # Merge [s, e) into the covered intervals.
        lo = bisect.bisect_left(covered, (s, -1))
        if lo > 0 and covered[lo - 1][1] >= s:
            lo -= 1
        hi = lo
        ns, ne = s, e
        while hi < len(covered) and covered[hi][0] <= ne:
            ns, ne = min(ns, covered[hi][0]), max(ne, covered[hi][1])
            hi += 1
        covered[lo:hi] = [(ns, ne)]
    keep.reverse()
    return keep


def _paint(start: int, end: int, pieces: List[Tuple[int, int, Source]]
           ) -> List[Tuple[int, int, Optional[Source]]]:
    """Which piece (newest wins) or the replica covers each byte of [start, end)."""
    # Boundaries inside the range, then the newest piece over each elementary interval.
    cuts = {start, end}
    for s, e, _src in pieces:
        if s < end and e > start:
            cuts.add(max(s, start))
            cuts.add(min(e, end))
    points = sorted(cuts)
    out: List[Tuple[int, int, Optional[Source]]] = []
    for a, b in zip(points, points[1:]):
        chosen: Optional[Source] = None
        base = 0
        for s, e, src in reversed(pieces):
            if s <= a and b <= e:
                chosen, base = src, s
                break
        if chosen is not None and chosen is not ZERO:
            chosen = (chosen[0], chosen[1] + (a - base))
        if out and out[-1][1] == a and _continues(out[-1], a, chosen):
            out[-1] = (out[-1][0], b, out[-1][2])
        else:
            out.append((a, b, chosen))
    return out


def _continues(prev: Tuple[int, int, Optional[Source]], at: int,
               src: Optional[Source]) -> bool:
    psrc = prev[2]
    if psrc is None or src is None:
        return psrc is None and src is None
    if psrc is ZERO or src is ZERO:
        return psrc is ZERO and src is ZERO
    return psrc[0] == src[0] and psrc[1] + (at - prev[0]) == src[1]


class Reader:
    """Reads a disk through an extent map: replica file plus journal segments."""

    def __init__(self, replica: str, segment_paths: Dict[int, str], emap: ExtentMap) -> None:
        self._replica = os.open(replica, os.O_RDONLY | os.O_CLOEXEC)
        self._segments = {n: os.open(p, os.O_RDONLY | os.O_CLOEXEC)
                          for n, p in segment_paths.items()}
        self.map = emap

    def pread(self, length: int, offset: int) -> bytes:
        parts = []
        for s, e, src in self.map.lookup(offset, length):
            n = e - s
            if src is None:
                data = os.pread(self._replica, n, s)
            elif src is ZERO:
                data = bytes(n)
            else:
                data = os.pread(self._segments[src[0]], n, src[1])
            if len(data) < n:
                data += bytes(n - len(data))  # a replica shorter than the disk reads zeroes
            parts.append(data)
        return b"".join(parts)

    def close(self) -> None:
        os.close(self._replica)
        for fd in self._segments.values():
            os.close(fd)
        self._segments = {}


def build_map(spec: Dict) -> ExtentMap:
    """The extent map of one disk of a view (the spec ``TargetGroup.view_spec`` makes):
    the disk's records after the replica's point ``base`` up to ``upto``, read from the
    segments' index files (the open segment's record headers, up to its size then)."""
    emap = ExtentMap()
    disk = spec["disk"]
    base = tuple(spec["base"])
    upto = tuple(spec["upto"])
    start_seg, start_pos = spec["start"]
    for segno, path, end in spec["segments"]:
        buf = read_idx(path, end)
        if buf is None:
            buf = scan_headers(path, end)
        for d, kind, _flags, gen, length, seq, offset, _t, pos in ENTRY.iter_unpack(buf):
            if pos >= end:
                break
            if d != disk or (segno == start_seg and pos < start_pos):
                continue
            if kind not in (KIND_WRITE, KIND_ZERO, KIND_TRIM) or not base < (gen, seq) <= upto:
                continue
            emap.add(offset, length, (segno, pos + RECORD.size) if kind == KIND_WRITE else ZERO)
    return emap


def open_reader(spec: Dict) -> Reader:
    return Reader(spec["replica"], {segno: path for segno, path, _end in spec["segments"]},
                  build_map(spec))
