"""``ferry verify``, site B's half: digests of a disk's chunks as of the newest point this
site has journaled (its replica overlaid with the journal up to the disk's durable record).

The source asks in a probe session (OPEN with ``verify``, ``agent/source/verify.py``) and
compares with the digests of its own disk. Each window of chunks (``WINDOW`` bytes at
most) is read with the group's lock held, so batches and promotion wait for one window
only; each window is at the disk's durable point of that moment, and the answer gives the
oldest of them (``at``): every digest is of a point at or after it. Records are read
through the journal reader, which checks each against its checksum: a damaged record fails
the request (``JournalCorrupt``) rather than hashing bytes this site would not return; so
does a read the disk fails (a ``StorageError`` naming the file and the byte).
"""

from __future__ import annotations

from typing import Any, List, Tuple

import xxhash

from formats import reads
from formats.records import KIND_TRIM, KIND_WRITE, KIND_ZERO, Point

from ..errors import StorageError
from .restore import overlay

WINDOW = 64 * 1024 * 1024


def point_digests(g: Any, index: int, chunk: int, first: int, count: int
                  ) -> Tuple[bytes, Point]:
    """xxh3_64 (8 bytes, big-endian) of chunks ``[first, first + count)`` of disk ``index``
    of group ``g`` (a ``TargetGroup``) at its newest journaled point, and that point."""
    size = g.disks[index].size
    per = max(1, WINDOW // chunk)
    out: List[bytes] = []
    at: Point = (1 << 64, 0)
    c = first
    while c < first + count:
        n = min(per, first + count - c)
        start, end = c * chunk, min(size, (c + n) * chunk)
        with g._lock:
            upto: Point = tuple(g.durable()[index])
            at = min(at, upto)
            try:
                data = _window(g, index, start, end, upto)
            except OSError as e:  # B's disk failed a read: refused, named, nothing hashed
                raise StorageError("group %s, disk %s: %s" % (
                    g.name, g.disks[index].name, reads.one_line(e)), e.filename,
                    e.errno) from None
        for i in range(n):
            out.append(xxhash.xxh3_64_digest(data[i * chunk:(i + 1) * chunk]))
        c += n
    return b"".join(out), at


def _window(g: Any, index: int, start: int, end: int, upto: Point) -> bytearray:
    """Bytes ``[start, end)`` of the disk at ``upto``: the replica, then every journal
    record of the disk after the replica's point up to ``upto`` that meets the window."""
    data = bytearray(reads.pread(g.fds[index], end - start, start,
                                 g.replica_path(g.disks[index].name)))
    if len(data) < end - start:
        data += bytes(end - start - len(data))  # past a sparse replica's end: zeroes
    for segno, e in overlay(g, index, upto):
        kind, offset, length = e[1], e[6], e[4]
        lo, hi = max(offset, start), min(offset + length, end)
        if lo >= hi:
            continue
        if kind == KIND_WRITE:
            rec = g.journal.read_at(segno, e[8])
            assert rec.data is not None
            data[lo - start:hi - start] = rec.data[lo - offset:hi - offset]
        elif kind in (KIND_ZERO, KIND_TRIM):
            data[lo - start:hi - start] = bytes(hi - lo)
    return data
