"""The kinds and flags of change records: one table for the splitter, the wire and the journal.

A record is one change of one disk, or a marker on a group's timeline. Its ``kind`` says
which; the numbers are part of three formats (the local wire, ``docs/splitter-protocol.md``;
the site-to-site BATCH, ``docs/wire.md``; the journal, ``docs/journal.md``) and never change.

    kind  name         where                    data
    1     write        splitter, wire, journal  the bytes written
    2     zero         splitter, wire, journal  none: [offset, +length) reads as zeroes
    3     trim         splitter, wire, journal  none: [offset, +length) reads as zeroes
    4     flush        splitter, wire, journal  none: a crash-consistent point of the disk
    5     consistent   splitter, wire, journal  none: the dirty map emptied, the stream is
                                                whole again from here
    32    seeded       wire, journal            the range's digest (wire), none (journal):
                                                site B's seed already holds these bytes
    33    applied      journal                  none: a change already in the replica
    64    checkpoint   journal                  a JSON group checkpoint
    65    failover     journal                  a JSON failover marker
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

KIND_WRITE = 1
KIND_ZERO = 2
KIND_TRIM = 3
KIND_FLUSH = 4
KIND_CONSISTENT = 5
KIND_SEEDED = 32
KIND_APPLIED = 33
KIND_CHECKPOINT = 64
KIND_FAILOVER = 65

# What a splitter may send.
KIND_NAMES = {
    KIND_WRITE: "write",
    KIND_ZERO: "zero",
    KIND_TRIM: "trim",
    KIND_FLUSH: "flush",
    KIND_CONSISTENT: "consistent",
}
# What a BATCH frame may carry.
WIRE_KINDS = frozenset(KIND_NAMES) | {KIND_SEEDED}
# What a journal segment may hold.
JOURNAL_KINDS = WIRE_KINDS | {KIND_APPLIED, KIND_CHECKPOINT, KIND_FAILOVER}
# Kinds whose journal record carries data after its header.
DATA_KINDS = (KIND_WRITE, KIND_CHECKPOINT, KIND_FAILOVER)
# Kinds that change a disk's bytes.
MAP_KINDS = (KIND_WRITE, KIND_ZERO, KIND_TRIM)

FLAG_FUA = 1
FLAG_RESYNC = 2        # data read back from the disk by a resync, not a guest write
FLAG_INCONSISTENT = 4  # written while regions were dirty: not a crash-consistent prefix

Point = Tuple[int, int]  # (generation, sequence) of a disk's change stream


@dataclass
class JRecord:
    """One record of a group's change stream as site B receives and journals it: a change
    of disk ``disk`` (its index in the group), or a marker (checkpoint, failover)."""
    disk: int
    gen: int
    seq: int
    kind: int
    flags: int
    offset: int
    length: int
    time_ns: int
    data: Optional[bytes] = None
