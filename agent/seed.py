"""Pre-seeded sync: site B starts a new group's replica from a copy it already holds.

Theory of operation
-------------------
``protect ... --preseeded DISK=PATH`` names a file on site B (a restored backup, an old
replica) that is nearly the disk. When the group's first session opens, site B copies that
file into the replica (``adopt``: holes and zero chunks stay holes, the admin's file is only
read) and keeps the xxh3_128 digest of every ``CHUNK`` of it. Site B sends those digests to
the source at the start of every session (SEED frames) until the disk's initial sync ends.

The initial sync runs as always: the splitter reads the whole disk back as resync records.
The source's shipper (``SeedList.substitute``) hashes each resync write that covers whole
chunks; when every chunk matches, it sends a SEEDED record in its place: same sequence
number, no data, the range's digest. Site B journals it as a record that changes nothing.

Why that is right: a chunk site B calls *untouched* (``SeedMap``) has had no record of the
stream touch it since the seed was adopted, so the replica plus the journal hold exactly
the seed's bytes there. A SEEDED record for it says "the disk holds these same bytes at
this sequence number", which is what a resync write of them would have said. So site B
refuses a SEEDED record for a chunk some earlier record touched, and the source, which
forwards records in stream order, stops using a chunk's digest as soon as it forwards any
other record that touches it (guest writes, zeroes, trims, resync data). A record the
source lost (a splitter killed before it shipped) never touched site B's replica, so the
chunk stays untouched there and a later SEEDED record for it is still right.

Both sides drop the seed of a disk at its first ``consistent`` record (the initial sync
is over): the source when it forwards it, site B when it journals it.

Site B's half (``SeedMap``, the seed files, ``adopt``) lives in ``agent/target/seeds.py``;
this module keeps what both sides share (``CHUNK``, the digests) and site A's half
(``SeedList``, ``substitute``, ``parse_frame``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

import xxhash

from formats.localwire import (
    FLAG_RESYNC,
    KIND_CONSISTENT,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
    Record,
)
from formats.records import KIND_SEEDED

from .errors import Invalid
from .protocol.frames import ProtocolError

CHUNK = 1024 * 1024        # the splitter's resync piece (nbd_plugin/link.py RESYNC_CHUNK)
DIGEST = 16                # xxh3_128
MAX_CHUNK = 64 * 1024 * 1024
TOUCHING = (KIND_WRITE, KIND_ZERO, KIND_TRIM)
_USABLE = bytes([1] + [0] * 255)  # touched map -> usable map


class SeedError(Invalid):
    """A seed that cannot be used; the message says why, for the admin."""


def chunks(size: int, chunk: int = CHUNK) -> int:
    return -(-size // chunk)


def digests_of(data: bytes, chunk: int = CHUNK) -> bytes:
    """The digests of ``data``, chunk by chunk (the last one may be short)."""
    view = memoryview(data)
    return b"".join(xxhash.xxh3_128_digest(view[i:i + chunk])
                    for i in range(0, len(view), chunk))


def range_digest(digests: bytes) -> bytes:
    """What a SEEDED record carries: the digest of its chunks' digests."""
    return xxhash.xxh3_128_digest(digests)


def _span(offset: int, length: int, chunk: int) -> Tuple[int, int]:
    """The chunks ``[first, end)`` that ``[offset, offset + length)`` overlaps."""
    return offset // chunk, -(-(offset + length) // chunk)


def _aligned(offset: int, length: int, size: int, chunk: int) -> bool:
    """Does the range cover whole chunks (the disk's last chunk may be short)?"""
    end = offset + length
    return length > 0 and offset % chunk == 0 and (end % chunk == 0 or end == size) \
        and end <= size

# -- site A ---------------------------------------------------------------------------------

class SeedList:
    """Site B's digests of one disk, as the source's shipper uses them in one session."""

    def __init__(self, size: int, chunk: int) -> None:
        n = chunks(size, chunk)
        self.size = size
        self.chunk = chunk
        self.digests = bytearray(n * DIGEST)
        self.usable = bytearray(n)  # 1: site B's digest of the chunk holds

    def add(self, first: int, digests: bytes, touched: bytes) -> None:
        n = len(touched)
        if len(digests) != n * DIGEST or first < 0 or first + n > len(self.usable):
            raise ValueError("SEED frame for chunks [%d, +%d) of a disk of %d"
                             % (first, n, len(self.usable)))
        self.digests[first * DIGEST:(first + n) * DIGEST] = digests
        self.usable[first:first + n] = touched.translate(_USABLE)

    def substitute(self, kind: int, flags: int, offset: int, length: int,
                   data: Optional[bytes]) -> Optional[bytes]:
        """A record about to be forwarded: the digest for a SEEDED record in its place
        (a resync write of whole chunks that all match site B's), else None."""
        if kind not in TOUCHING or not length:
            return None
        first, end = _span(offset, length, self.chunk)
        if kind == KIND_WRITE and flags & FLAG_RESYNC and data is not None \
                and _aligned(offset, length, self.size, self.chunk) \
                and self.usable.find(0, first, end) < 0:
            mine = digests_of(data, self.chunk)
            if mine == self.digests[first * DIGEST:end * DIGEST]:
                return range_digest(mine)
        self.usable[first:end] = bytes(end - first)
        return None


def substitute(lists: List[Optional[SeedList]], items: List[Tuple[int, Record]]
               ) -> List[Tuple[int, Record]]:
    """A batch's (disk, record) pairs, in stream order, with a SEEDED record in place of
    each resync write that site B's seed already holds; a disk's list ends at its first
    ``consistent`` record."""
    out = []
    for i, r in items:
        seeds = lists[i] if 0 <= i < len(lists) else None
        if seeds is not None:
            if r.kind == KIND_CONSISTENT:
                lists[i] = None
            else:
                digest = seeds.substitute(r.kind, r.flags, r.offset, r.length, r.data)
                if digest is not None:
                    r = r._replace(kind=KIND_SEEDED, data=digest)
        out.append((i, r))
    return out


def add_frame(msg: Any, lists: List[Optional[SeedList]], sizes: List[int]) -> None:
    """A SEED message from site B (``protocol.messages.Seed``, its fields checked there)
    into the session's lists; frames.ProtocolError if its digests do not fit the disk."""
    seeds = lists[msg.disk]
    if seeds is None or seeds.chunk != msg.chunk:
        seeds = lists[msg.disk] = SeedList(sizes[msg.disk], msg.chunk)
    try:
        seeds.add(msg.first, msg.digests, msg.touched)
    except ValueError as e:
        raise ProtocolError(str(e)) from None
