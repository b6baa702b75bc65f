"""Messages between a splitter and its host agent, over a Unix stream socket.

Standard library only: this module is imported both by the nbdkit plugin (which embeds the
system Python, 3.9 on EL9) and by the agent.

Every message is a fixed header followed by ``length`` bytes of payload::

    offset  size  field
    0       2     type      MSG_* below
    2       2     reserved  0
    4       4     length    payload bytes (at most MAX_PAYLOAD)

All integers are little-endian. Payloads:

- ``MSG_RECORDS`` (splitter -> agent): a batch header, then ``count`` records, each a record
  header followed, for ``KIND_WRITE`` only, by ``length`` bytes of data::

      batch header (16 bytes)
      0   8  watermark_ns  CLOCK_MONOTONIC; every change that completed before it is in
                           this batch or an earlier one
      8   4  count
      12  4  reserved

      record header (40 bytes)
      0   8  seq           per-disk, per-generation, starts at 1, no gaps
      8   8  time_ns       CLOCK_MONOTONIC when the local write completed
      16  8  offset
      24  4  length
      28  4  gen           splitter generation (bumped at every splitter start)
      32  1  kind          KIND_*
      33  1  flags         FLAG_*
      34  6  reserved

- ``MSG_ACK`` (agent -> splitter): gen u32, reserved u32, seq u64: every record of that
  generation up to ``seq`` is durable on the target site.
- every other message carries a JSON object (control messages are rare and small).
"""

from __future__ import annotations

import json
import struct
from typing import Any, List, NamedTuple, Optional, Tuple

# The record kinds and flags (records.py) are part of this format; imported here so that
# users of the local wire find them with it.
from .records import (  # noqa: F401
    FLAG_FUA,
    FLAG_INCONSISTENT,
    FLAG_RESYNC,
    KIND_CONSISTENT,
    KIND_FLUSH,
    KIND_NAMES,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
)

HEADER = struct.Struct("<HHI")
assert HEADER.size == 8

BATCH = struct.Struct("<QII")
assert BATCH.size == 16

RECORD = struct.Struct("<QQQIIBB6x")
assert RECORD.size == 40

ACK = struct.Struct("<IIQ")
assert ACK.size == 16

MAX_PAYLOAD = 64 * 1024 * 1024

# splitter -> agent
MSG_HELLO = 1        # JSON: disk_id, gen, size, instance, state
MSG_RECORDS = 2
MSG_STATE = 3        # JSON: counters for status
MSG_SYNC_REPLY = 4   # JSON: token, gen, seq
# agent -> splitter
MSG_ACK = 16
MSG_REWIND = 17      # JSON: {}: resend everything not acked yet
MSG_SYNC_REQ = 18    # JSON: token
MSG_FENCE = 19       # JSON: {"fenced": bool, "reason": str}: refuse (or again take) writes;
                     # sent only to splitters whose HELLO says "fence": 1
MSG_RESYNC = 20      # JSON: {"ranges": [[offset, length], ...]}: read these again and send
                     # them (a repair); only to splitters whose HELLO says "resync": 1
MAX_RESYNC_RANGES = 65536



class ProtocolError(Exception):
    """The peer broke the local protocol: drop the connection."""


class Record(NamedTuple):
    seq: int
    time_ns: int
    offset: int
    length: int
    gen: int
    kind: int
    flags: int
    data: Optional[bytes]

    @property
    def nbytes(self) -> int:
        """Bytes this record holds in memory (its header counts too)."""
        return RECORD.size + (len(self.data) if self.data is not None else 0)


def pack_header(msg_type: int, length: int) -> bytes:
    if length > MAX_PAYLOAD:
        raise ValueError("payload of %d bytes is over the limit" % length)
    return HEADER.pack(msg_type, 0, length)


def unpack_header(buf: bytes) -> Tuple[int, int]:
    if len(buf) != HEADER.size:
        raise ProtocolError("message header of %d bytes, expected %d" % (len(buf), HEADER.size))
    msg_type, _reserved, length = HEADER.unpack(buf)
    if length > MAX_PAYLOAD:
        raise ProtocolError("message of %d bytes is over the limit of %d" % (length, MAX_PAYLOAD))
    return msg_type, length


def pack_json(msg_type: int, obj: Any) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return pack_header(msg_type, len(body)) + body


def unpack_json(payload: bytes) -> Any:
    try:
        obj = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise ProtocolError("bad JSON control message: %s" % e) from None
    if not isinstance(obj, dict):
        raise ProtocolError("control message is not a JSON object")
    return obj


def pack_ack(gen: int, seq: int) -> bytes:
    return pack_header(MSG_ACK, ACK.size) + ACK.pack(gen, 0, seq)


def unpack_ack(payload: bytes) -> Tuple[int, int]:
    if len(payload) != ACK.size:
        raise ProtocolError("ACK of %d bytes, expected %d" % (len(payload), ACK.size))
    gen, _reserved, seq = ACK.unpack(payload)
    return gen, seq


def pack_records(records: List[Record], watermark_ns: int) -> List[bytes]:
    """Return the message as a list of buffers (header first), for ``sendmsg``."""
    parts: List[bytes] = [b"", BATCH.pack(watermark_ns, len(records), 0)]
    size = BATCH.size
    for r in records:
        parts.append(RECORD.pack(r.seq, r.time_ns, r.offset, r.length, r.gen, r.kind, r.flags))
        size += RECORD.size
        if r.kind == KIND_WRITE:
            assert r.data is not None and len(r.data) == r.length
            parts.append(r.data)
            size += r.length
    parts[0] = pack_header(MSG_RECORDS, size)
    return parts


def unpack_records(payload: bytes) -> Tuple[int, List[Record]]:
    """Parse a RECORDS payload; every length is checked before it is used."""
    view = memoryview(payload)
    if len(view) < BATCH.size:
        raise ProtocolError("RECORDS payload shorter than its batch header")
    watermark_ns, count, _ = BATCH.unpack_from(view, 0)
    pos = BATCH.size
    records: List[Record] = []
    for _ in range(count):
        if pos + RECORD.size > len(view):
            raise ProtocolError("RECORDS payload truncated in a record header")
        seq, time_ns, offset, length, gen, kind, flags = RECORD.unpack_from(view, pos)
        pos += RECORD.size
        if kind not in KIND_NAMES:
            raise ProtocolError("unknown record kind %d" % kind)
        data = None
        if kind == KIND_WRITE:
            if pos + length > len(view):
                raise ProtocolError("RECORDS payload truncated in record data")
            data = bytes(view[pos:pos + length])
            pos += length
        records.append(Record(seq, time_ns, offset, length, gen, kind, flags, data))
    if pos != len(view):
        raise ProtocolError("RECORDS payload has %d stray bytes" % (len(view) - pos))
    return watermark_ns, records
