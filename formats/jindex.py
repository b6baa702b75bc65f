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


def idx_covers(buf: bytes) -> Optional[int]:
    """The segment size a version 2 index file says it covers when its crc holds (whatever
    the segment's size now), else None: a closed segment shorter than this lost bytes."""
    if len(buf) < TRAILER.size + COUNTS.size:
        return None
    magic, crc, size = TRAILER.unpack_from(buf, len(buf) - TRAILER.size)
    if magic != IDX_MAGIC or crc != zlib.crc32(memoryview(buf)[:len(buf) - TRAILER.size]):
        return None
    return int(size)
