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

Site B's half (``SeedMap``, the seed files, ``adopt``) lives in ``agent/target/seeds.py``,
site A's (``SeedList``, ``substitute``, ``add_frame``) in ``agent/source/seeds.py``; this
module keeps what both sides share: the chunks and their digests.
"""

from __future__ import annotations

from typing import Tuple

import xxhash

from formats.localwire import (
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
)

from .errors import Invalid

CHUNK = 1024 * 1024        # the splitter's resync piece (nbd_plugin/link.py RESYNC_CHUNK)
DIGEST = 16                # xxh3_128
MAX_CHUNK = 64 * 1024 * 1024
TOUCHING = (KIND_WRITE, KIND_ZERO, KIND_TRIM)


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


def span(offset: int, length: int, chunk: int) -> Tuple[int, int]:
    """The chunks ``[first, end)`` that ``[offset, offset + length)`` overlaps."""
    return offset // chunk, -(-(offset + length) // chunk)


def aligned(offset: int, length: int, size: int, chunk: int) -> bool:
    """Does the range cover whole chunks (the disk's last chunk may be short)?"""
    end = offset + length
    return length > 0 and offset % chunk == 0 and (end % chunk == 0 or end == size) \
        and end <= size
