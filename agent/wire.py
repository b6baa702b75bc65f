"""Frames between a source agent and a target agent (TCP, port 4005 by default).

Every frame is a fixed 24-byte header and a body::

    offset  size  field
    0       4     magic     b"FRY\\x01"
    4       1     version   WIRE_VERSION
    5       1     type      T_* below
    6       2     flags     F_ZSTD: the body is zstd-compressed
    8       4     length    body bytes as sent (at most MAX_FRAME)
    12      4     reserved  0
    16      8     checksum  xxh3_64 of the body as sent

The body, once decompressed (at most MAX_BODY bytes), is a msgpack map. The fields of each
type are in docs/wire.md; ``decode_body`` checks them before anyone uses them. Integers are
little-endian.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Optional

import msgpack
import xxhash
import zstandard

from formats.localwire import KIND_NAMES, KIND_WRITE

from .errors import FerryError, RemoteProtocolError
from .journal import KIND_SEEDED, JRecord

MAGIC = b"FRY\x01"
WIRE_VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
assert HEADER.size == 24

MAX_FRAME = 48 * 1024 * 1024
MAX_BODY = 64 * 1024 * 1024
MAX_RECORD = 32 * 1024 * 1024
MAX_RECORDS = 65536
MAX_DISKS = 64
MAX_NAME = 128

F_ZSTD = 1
COMPRESS_MIN_GAIN = 0.10
COMPRESS_BACKOFF = 16

T_HELLO = 1      # source -> target
T_WELCOME = 2    # target -> source
T_OPEN = 3       # source -> target: a group and its disks
T_OPENED = 4     # target -> source: what the target already holds
T_BATCH = 5      # source -> target: change records
T_ACK = 6        # target -> source: durable up to
T_ERROR = 7      # either way, then the sender closes
T_SEED = 8       # target -> source, after OPENED: digests of a pre-seeded disk's chunks
T_PAIR = 20      # source -> target, over TLS: pair with this token (agent/tls.py)
T_PAIRED = 21    # target -> source: paired

TYPE_NAMES = {T_HELLO: "HELLO", T_WELCOME: "WELCOME", T_OPEN: "OPEN", T_OPENED: "OPENED",
              T_BATCH: "BATCH", T_ACK: "ACK", T_ERROR: "ERROR", T_SEED: "SEED",
              T_PAIR: "PAIR", T_PAIRED: "PAIRED"}

# Error codes carried by T_ERROR.
E_PROTOCOL = "protocol"
E_SIZE_MISMATCH = "size-mismatch"
E_BAD_GROUP = "bad-group"
E_STORAGE = "storage"
E_TLS_REQUIRED = "tls-required"   # plaintext to a site that speaks only TLS
E_UNPAIRED = "unpaired"           # TLS without a paired certificate
E_PAIRING = "pairing-refused"     # a bad, used or expired token
E_BAD_SEED = "bad-seed"

SEEDED_DATA = 16  # a KIND_SEEDED record's data: the digest of its chunks' digests


class ProtocolError(RemoteProtocolError):
    """The peer broke the protocol: log it, close the connection, touch no replica."""


class RemoteError(FerryError):
    """The peer refused a request with a T_ERROR frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Header:
    type: int
    flags: int
    length: int
    checksum: int


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(body: bytes) -> Any:
    """msgpack from the network: limits on every container, str keys only."""
    try:
        return msgpack.unpackb(
            body, raw=False, strict_map_key=True, use_list=True,
            max_bin_len=MAX_BODY, max_str_len=MAX_NAME * 64, max_array_len=MAX_RECORDS * 2,
            max_map_len=MAX_DISKS * 4, max_ext_len=0,
        )
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as e:
        raise ProtocolError("bad msgpack body: %s" % e) from None


class Codec:
    """Encodes and decodes frames; one per connection (it holds zstd contexts)."""

    def __init__(self, level: int = 1) -> None:
        self._cctx = zstandard.ZstdCompressor(level=level)
        self._dctx = zstandard.ZstdDecompressor()
        self._skip = 0              # frames left to send without trying to compress
        self.bytes_in = 0           # bodies offered for compression, and what they became
        self.bytes_out = 0

    def encode(self, ftype: int, obj: Any, compress: bool = False) -> bytes:
        body = pack(obj)
        flags = 0
        if compress and len(body) > 512:
            # Compression that does not pay (encrypted or random data) costs a core for
            # nothing: after a frame that shrank less than COMPRESS_MIN_GAIN, the next
            # COMPRESS_BACKOFF frames go as they are, then compression is tried again.
            if self._skip:
                self._skip -= 1
            else:
                packed = self._cctx.compress(body)
                if len(packed) <= len(body) * (1 - COMPRESS_MIN_GAIN):
                    self.bytes_in += len(body)
                    self.bytes_out += len(packed)
                    body, flags = packed, F_ZSTD
                else:
                    self._skip = COMPRESS_BACKOFF
        if len(body) > MAX_FRAME:
            raise ValueError("frame body of %d bytes is over the limit" % len(body))
        return HEADER.pack(MAGIC, WIRE_VERSION, ftype, flags, len(body), 0,
                           xxhash.xxh3_64_intdigest(body)) + body

    @staticmethod
    def decode_header(buf: bytes) -> Header:
        if len(buf) != HEADER.size:
            raise ProtocolError("frame header of %d bytes, expected %d" % (len(buf), HEADER.size))
        magic, version, ftype, flags, length, _reserved, checksum = HEADER.unpack(buf)
        if magic != MAGIC:
            raise ProtocolError("bad magic %r: not a Ferry peer" % magic)
        if version != WIRE_VERSION:
            raise ProtocolError("wire version %d, this agent speaks %d" % (version, WIRE_VERSION))
        if ftype not in TYPE_NAMES:
            raise ProtocolError("unknown frame type %d" % ftype)
        if flags & ~F_ZSTD:
            raise ProtocolError("unknown frame flags %#x" % flags)
        if length > MAX_FRAME:
            raise ProtocolError("frame of %d bytes is over the limit of %d" % (length, MAX_FRAME))
        return Header(ftype, flags, length, checksum)

    def decode_body(self, header: Header, body: bytes) -> dict:
        if xxhash.xxh3_64_intdigest(body) != header.checksum:
            raise ProtocolError("%s frame fails its checksum" % TYPE_NAMES[header.type])
        if header.flags & F_ZSTD:
            try:
                # decompress() trusts a content size in the frame over max_output_size.
                if zstandard.frame_content_size(body) > MAX_BODY:
                    raise ProtocolError("body decompresses past the limit")
                body = self._dctx.decompress(body, max_output_size=MAX_BODY,
                                             allow_extra_data=False)
            except zstandard.ZstdError as e:
                raise ProtocolError("bad zstd body: %s" % e) from None
            if len(body) > MAX_BODY:
                raise ProtocolError("body decompresses past the limit")
        obj = unpack(body)
        if not isinstance(obj, dict):
            raise ProtocolError("%s body is not a map" % TYPE_NAMES[header.type])
        return obj


# -- field checks, shared by both sides -----------------------------------------------------

def field(obj: dict, name: str, kind: type | tuple[type, ...]) -> Any:
    try:
        value = obj[name]
    except KeyError:
        raise ProtocolError("missing field %r" % name) from None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ProtocolError("field %r has the wrong type" % name)
    return value


def name_field(obj: dict, key: str) -> str:
    value = field(obj, key, str)
    if not value or len(value) > MAX_NAME or "/" in value or value.startswith(".") \
            or any(c in value for c in "\0\n"):
        raise ProtocolError("field %r is not a valid name: %r" % (key, value[:MAX_NAME]))
    return value


# -- BATCH bodies ---------------------------------------------------------------------------
#
# {"group": str, "recs": bin, "data": bin, "wall_ns": int, "mono_ns": int}
#
# "recs" is an array of 40-byte records; "data" is the data of the write records, in order:
#
#     offset  size  field
#     0       2     disk      index in the group
#     2       1     kind      localwire.KIND_*
#     3       1     flags     localwire.FLAG_*
#     4       4     length
#     8       4     gen
#     12      4     reserved
#     16      8     seq
#     24      8     offset
#     32      8     time_ns   source CLOCK_MONOTONIC at completion
#
# Besides the splitter's kinds, KIND_SEEDED (agent/seed.py): a resync of whole chunks that
# site B's seed already holds; its "data" is SEEDED_DATA bytes, the range's digest.
#
# "wall_ns" and "mono_ns" are the source's wall and monotonic clocks when it sent the batch.
#
# "checkpoints" (optional, protocol 1 extension) is an array of group checkpoints, each
# {"id": str, "time_ns": int, "kind": "auto"|"user", "tag": str|None, "cut": [[gen, seq]...]}
# (checkpoints.parse_wire checks them). A checkpoint comes in the batch that holds, or after
# the batches that held, every record of its cut; the target journals it after the batch's
# records and lists its id in the ACK's "checkpoints".

BATCH_RECORD = struct.Struct("<HBBII4xQQQ")
assert BATCH_RECORD.size == 40


def encode_batch(group: str, records: list, wall_ns: int, mono_ns: int,
                 checkpoints: Optional[list] = None) -> dict:
    """``records`` are (disk index, localwire.Record) pairs."""
    recs = bytearray()
    data = []
    for disk, r in records:
        recs += BATCH_RECORD.pack(disk, r.kind, r.flags, r.length, r.gen, r.seq, r.offset,
                                  r.time_ns)
        if r.kind in (KIND_WRITE, KIND_SEEDED):
            data.append(r.data)
    body = {"group": group, "recs": bytes(recs), "data": b"".join(data),
            "wall_ns": wall_ns, "mono_ns": mono_ns}
    if checkpoints:
        body["checkpoints"] = checkpoints
    return body


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
        if kind not in KIND_NAMES and kind != KIND_SEEDED:
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
