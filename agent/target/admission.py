"""Which records and checkpoints of a batch a target group admits: every check before any
write, so a bad batch changes nothing (logic only; ``TargetGroup.accept`` does the writing).

Theory of operation
-------------------
Sequence rules for a disk whose newest journaled record is (G, S): a record of a lower
generation, or of G with a sequence up to S, is a duplicate and dropped; (G, S+1) and
(G' > G, 1) are next; anything else is a gap and a protocol error. A record must lie inside
its disk, and a write carry exactly its length of data (at most ``MAX_RECORD``).

A SEEDED record (``seeds.py``) must name whole chunks that no earlier record touched since
the seed was adopted and that the seed holds as the source does; it is journaled without
its digest. The batch is followed through a copy of each disk's seed map, so a batch that
touches a chunk and then claims it seeded is refused.

A group checkpoint's cut must not lie beyond the records journaled with it; one already
journaled (the source resent it) is acked again and not journaled twice.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

from formats.records import KIND_CHECKPOINT, KIND_CONSISTENT, KIND_SEEDED, KIND_WRITE, JRecord

from ..checkpoints import Checkpoint
from ..protocol.frames import MAX_RECORD, ProtocolError
from .seeds import SeedMap


class Disk(Protocol):
    """What the checks read of a disk: its size and its newest journaled record."""
    name: str
    size: int
    gen: int
    seq: int


def fresh(group: str, disks: Sequence[Disk], seeds: Sequence[Optional[SeedMap]],
          records: List[JRecord]) -> List[JRecord]:
    """The records of a batch that are new, checked (see the module)."""
    cursor = [(d.gen, d.seq) for d in disks]
    out = []
    batch_seeds: Dict[int, Optional[SeedMap]] = {}  # as this batch leaves them
    for r in records:
        if not 0 <= r.disk < len(disks):
            raise ProtocolError("record for disk %d; group %s has %d disks"
                                % (r.disk, group, len(disks)))
        st = disks[r.disk]
        if (r.kind == KIND_WRITE and r.length > MAX_RECORD) or r.offset < 0 \
                or r.offset + r.length > st.size:
            raise ProtocolError("record [%d, +%d) outside disk %s of %d bytes"
                                % (r.offset, r.length, st.name, st.size))
        if r.kind == KIND_WRITE and (r.data is None or len(r.data) != r.length):
            raise ProtocolError("write record with %s bytes of data for length %d"
                                % (None if r.data is None else len(r.data), r.length))
        gen, seq = cursor[r.disk]
        if r.gen < gen or (r.gen == gen and r.seq <= seq):
            continue  # duplicate of a journaled record
        if not ((r.gen == gen and r.seq == seq + 1) or (r.gen > gen and r.seq == 1)):
            raise ProtocolError("disk %s: record %d/%d after %d/%d leaves a gap"
                                % (st.name, r.gen, r.seq, gen, seq))
        cursor[r.disk] = (r.gen, r.seq)
        if r.kind == KIND_SEEDED or seeds[r.disk] is not None:
            r = _seeded(st.name, r, seeds[r.disk], batch_seeds)
        out.append(r)
    return out


def _seeded(disk: str, r: JRecord, held: Optional[SeedMap],
            batch_seeds: Dict[int, Optional[SeedMap]]) -> JRecord:
    """Follow a batch's records through a copy of the disk's seed map: a SEEDED record
    must name untouched chunks that the seed holds as the source does."""
    if r.disk not in batch_seeds:
        batch_seeds[r.disk] = held.copy() if held is not None else None
    m = batch_seeds[r.disk]
    if r.kind == KIND_CONSISTENT:
        batch_seeds[r.disk] = None
    if r.kind != KIND_SEEDED:
        if m is not None:
            m.touch(r.kind, r.offset, r.length)
        return r
    reason = "no seed (or its initial sync is over)" if m is None else \
        m.check(r.offset, r.length, r.data)
    if reason:
        raise ProtocolError("disk %s: %s" % (disk, reason))
    return replace(r, data=None)  # nothing of it goes into the journal


def new_checkpoints(disks: Sequence[Disk], fresh: List[JRecord],
                    known: Sequence[Checkpoint], checkpoints: List[Checkpoint],
                    clocks: Optional[Tuple[int, int]]) -> Tuple[List[Checkpoint], List[str]]:
    """The batch's checkpoints not journaled yet, and the ids of all of them (see the
    module). ``clocks`` (wall_ns, mono_ns) give each new one its source wall time."""
    cursor = [(d.gen, d.seq) for d in disks]
    for r in fresh:
        cursor[r.disk] = (r.gen, r.seq)
    ids = {c.id for c in known}
    new = []
    out = []
    for c in checkpoints:
        if any(cur < cut for cur, cut in zip(cursor, c.cut)):
            raise ProtocolError("checkpoint %s comes before the records of its cut" % c.id)
        out.append(c.id)
        if c.id in ids:
            continue
        ids.add(c.id)
        if clocks is not None:
            c.wall_ns = clocks[0] - (clocks[1] - c.time_ns)
        new.append(c)
    return new, out


def marker(c: Checkpoint) -> JRecord:
    """The journal record of a group checkpoint."""
    data = c.encode()
    return JRecord(0, 0, 0, KIND_CHECKPOINT, 0, 0, len(data), c.time_ns, data)
