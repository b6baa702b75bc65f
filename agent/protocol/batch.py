"""BATCH bodies: a group's change records on the wire (site to site).

{"group": str, "recs": bin, "data": bin, "wall_ns": int, "mono_ns": int}

"recs" is an array of 40-byte records; "data" is the data of the write records, in order:

    offset  size  field
    0       2     disk      index in the group
    2       1     kind      localwire.KIND_*
    3       1     flags     localwire.FLAG_*
    4       4     length
    8       4     gen
    12      4     reserved
    16      8     seq
    24      8     offset
    32      8     time_ns   source CLOCK_MONOTONIC at completion

Besides the splitter's kinds, KIND_SEEDED (agent/seed.py): a resync of whole chunks that
site B's seed already holds; its "data" is SEEDED_DATA bytes, the range's digest.

"wall_ns" and "mono_ns" are the source's wall and monotonic clocks when it sent the batch.

"checkpoints" (optional, protocol 1 extension) is an array of group checkpoints, each
{"id": str, "time_ns": int, "kind": "auto"|"user", "tag": str|None, "cut": [[gen, seq]...]}
(checkpoints.parse_wire checks them). A checkpoint comes in the batch that holds, or after
the batches that held, every record of its cut; the target journals it after the batch's
records and lists its id in the ACK's "checkpoints".
"""

from __future__ import annotations

import struct
from typing import List, Optional, Tuple

from formats.records import KIND_SEEDED, KIND_WRITE, WIRE_KINDS, JRecord

from .frames import MAX_RECORD, MAX_RECORDS, ProtocolError, field

SEEDED_DATA = 16  # a KIND_SEEDED record's data: the digest of its chunks' digests

BATCH_RECORD = struct.Struct("<HBBII4xQQQ")
assert BATCH_RECORD.size == 40


def encode_batch(group: str, records: list, wall_ns: int, mono_ns: int,
                 checkpoints: Optional[list] = None) -> dict:
    """``records`` are (disk index, localwire.Record) pairs."""
    body, data = batch_parts(group, records, wall_ns, mono_ns, checkpoints)
    body["data"] = b"".join(data)
    return body


def batch_parts(group: str, records: list, wall_ns: int, mono_ns: int,
                checkpoints: Optional[list] = None) -> Tuple[dict, List[bytes]]:
    """The body of ``encode_batch`` but "data", and the pieces "data" is the join of."""
    recs = bytearray(BATCH_RECORD.size * len(records))
    data = []
    pos = 0
    for disk, r in records:
        BATCH_RECORD.pack_into(recs, pos, disk, r.kind, r.flags, r.length, r.gen, r.seq,
                               r.offset, r.time_ns)
        pos += BATCH_RECORD.size
        if r.kind in (KIND_WRITE, KIND_SEEDED):
            data.append(r.data)
    body = {"group": group, "recs": bytes(recs), "wall_ns": wall_ns, "mono_ns": mono_ns}
    if checkpoints:
        body["checkpoints"] = checkpoints
    return body, data


def decode_batch(body: dict) -> list:
    """The records of a BATCH body as journal records; lengths checked before use."""
    recs = field(body, "recs", bytes)
    data = memoryview(field(body, "data", bytes))
    if len(recs) % BATCH_RECORD.size:
        raise ProtocolError("BATCH records of %d bytes, not a multiple of %d"
                            % (len(recs), BATCH_RECORD.size))
    if len(recs) // BATCH_RECORD.size > MAX_RECORDS:
        raise ProtocolError("BATCH of more than %d records" % MAX_RECORDS)
    out = []
    pos = 0
    for disk, kind, flags, length, gen, seq, offset, time_ns in BATCH_RECORD.iter_unpack(recs):
        if kind not in WIRE_KINDS:
            raise ProtocolError("unknown record kind %d" % kind)
        if kind == KIND_WRITE and length > MAX_RECORD:
            raise ProtocolError("write record of %d bytes is over the limit" % length)
        chunk = None
        if kind in (KIND_WRITE, KIND_SEEDED):
            n = length if kind == KIND_WRITE else SEEDED_DATA
            if pos + n > len(data):
                raise ProtocolError("BATCH data shorter than its write records")
            chunk = bytes(data[pos:pos + n])
            pos += n
        out.append(JRecord(disk, gen, seq, kind, flags, offset, length, time_ns, chunk))
    if pos != len(data):
        raise ProtocolError("BATCH has %d bytes of data no record claims" % (len(data) - pos))
    return out
