"""Pre-seeded sync, site A's half: the digests site B sent, and the resync records they
replace with SEEDED records (the theory of operation is in ``agent/seed.py``).
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple

from formats.localwire import FLAG_RESYNC, KIND_CONSISTENT, KIND_WRITE, Record
from formats.records import KIND_SEEDED

from ..protocol.frames import ProtocolError
from ..seed import DIGEST, TOUCHING, aligned, chunks, digests_of, range_digest, span

_USABLE = bytes([1] + [0] * 255)  # touched map -> usable map

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
        first, end = span(offset, length, self.chunk)
        if kind == KIND_WRITE and flags & FLAG_RESYNC and data is not None \
                and aligned(offset, length, self.size, self.chunk) \
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
