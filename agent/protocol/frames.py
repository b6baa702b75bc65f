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
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Union

import msgpack
import xxhash
import zstandard

from ..errors import FerryError, RemoteProtocolError
from . import compression

MAGIC = b"FRY\x01"
WIRE_VERSION = 1
HEADER = struct.Struct("<4sBBHIIQ")
assert HEADER.size == 24

MAX_FRAME = 48 * 1024 * 1024
# A peer that has not said HELLO (or PAIR) yet, which may be a stranger: its first frame
# can be no larger than the largest first frame (a PAIR carries a certificate, ~1 KiB, a
# HELLO ~40 bytes). A header announcing more is refused before any of the body is read;
# a frame read under this limit is also decoded under small limits (``PREAUTH_UNPACK``,
# and zstd may not inflate it past MAX_FIRST_FRAME), so a stranger's frame costs this site
# a few tens of KiB at most (docs/security.md).
MAX_FIRST_FRAME = 16 * 1024
PREAUTH_UNPACK = {"max_bin_len": 1024, "max_str_len": 8 * 1024, "max_array_len": 16,
                  "max_map_len": 16, "max_ext_len": 0}
MAX_BODY = 64 * 1024 * 1024
MAX_RECORD = 32 * 1024 * 1024
MAX_RECORDS = 65536
MAX_DISKS = 64
MAX_NAME = 128

F_ZSTD = 1
Frame = Union[bytes, bytearray, memoryview]  # what encode_with_bin gives: bytes-like, sendable

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
E_FAILED_OVER = "failed-over"     # the group failed over to the target: the source is fenced
E_JOURNAL_FULL = "journal-full"   # site B's file system is full: nothing past the ack is kept
E_JOURNAL_RESERVE = "journal-reserve"  # site B cannot hold the journal reserve asked



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
    limit: int = MAX_FRAME  # the limit it was read under: MAX_FIRST_FRAME before the peer is known

    @property
    def preauth(self) -> bool:
        return self.limit <= MAX_FIRST_FRAME


def pack(obj: Any) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def map_header(n: int) -> bytes:
    """msgpack's header of a map of ``n`` pairs."""
    return bytes([0x80 | n]) if n < 16 else struct.pack(">BH", 0xDE, n)


def bin_header(n: int) -> bytes:
    """msgpack's header of ``n`` bytes of bin (what ``pack`` gives a bytes object)."""
    if n < 0x100:
        return struct.pack(">BB", 0xC4, n)
    if n < 0x10000:
        return struct.pack(">BH", 0xC5, n)
    return struct.pack(">BI", 0xC6, n)


def unpack(body: bytes, preauth: bool = False) -> Any:
    """msgpack from the network: limits on every container, str keys only; ``preauth``:
    the small limits of a stranger's first frame (PREAUTH_UNPACK)."""
    limits = PREAUTH_UNPACK if preauth else {
        "max_bin_len": MAX_BODY, "max_str_len": MAX_NAME * 64,
        "max_array_len": MAX_RECORDS * 2, "max_map_len": MAX_DISKS * 4, "max_ext_len": 0}
    try:
        return msgpack.unpackb(body, raw=False, strict_map_key=True, use_list=True, **limits)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            TypeError) as e:
        raise ProtocolError("bad msgpack body: %s" % e) from None


class Codec:
    """Encodes and decodes frames; one per connection (it holds zstd contexts and the
    compression ``Policy`` of the connection: compression.py)."""

    def __init__(self, level: int = 1, policy: Optional[compression.Policy] = None) -> None:
        self.policy = policy or compression.Policy(compression.mode_from_env())
        self._cctx: Dict[int, zstandard.ZstdCompressor] = {
            compression.LEVEL: zstandard.ZstdCompressor(level=level)}
        self._dctx = zstandard.ZstdDecompressor()
        self._scratch: Optional[bytearray] = None  # encode_with_bin's buffer, between frames
        self.bytes_in = 0           # bodies sent compressed, and what they became
        self.bytes_out = 0

    def encode(self, ftype: int, obj: Any, compress: bool = False) -> bytes:
        frame = self._frame(ftype, memoryview(pack(obj)), None, compress)
        assert isinstance(frame, bytes)
        return frame

    def encode_with_bin(self, ftype: int, fields: Dict[str, Any], key: str,
                        parts: Sequence[bytes], compress: bool = False) -> Frame:
        """The frame of ``dict(fields, key=b"".join(parts))``, built with one copy of each
        part (no msgpack buffer, no join): the map is written by hand, ``key`` last. The
        receiver sees the same map as ``encode`` would give it. The body is built in a
        buffer this codec keeps while it compresses frames (fresh memory costs a page fault
        per page); a frame sent as it is takes that buffer with it."""
        total = sum(len(p) for p in parts)
        head = bytearray(map_header(len(fields) + 1))
        for k, v in fields.items():
            head += pack(k)
            head += pack(v)
        head += pack(key)
        head += bin_header(total)
        size = HEADER.size + len(head) + total
        buf = self._scratch if self._scratch is not None and len(self._scratch) >= size \
            else bytearray(size)
        self._scratch = None
        pos = HEADER.size + len(head)
        buf[HEADER.size:pos] = head
        for p in parts:
            buf[pos:pos + len(p)] = p
            pos += len(p)
        frame = self._frame(ftype, memoryview(buf)[HEADER.size:size], buf, compress)
        if frame is not buf and not isinstance(frame, memoryview):
            self._scratch = buf  # sent compressed: the buffer is free again
        return frame

    def _frame(self, ftype: int, body: memoryview, buf: Optional[bytearray],
               compress: bool) -> Frame:
        """A frame of ``body``; ``buf``, when given, holds it after HEADER.size free bytes
        (``encode_with_bin``): then the frame is ``buf`` (or a view of its start)."""
        flags = 0
        level = self.policy.level_for(body) if compress else None
        if level is not None:
            cctx = self._cctx.get(level)
            if cctx is None:
                cctx = self._cctx[level] = zstandard.ZstdCompressor(level=level)
            t = time.thread_time()
            packed = cctx.compress(body)
            if self.policy.compressed(level, len(body), len(packed), time.thread_time() - t):
                self.bytes_in += len(body)
                self.bytes_out += len(packed)
                body, buf, flags = memoryview(packed), None, F_ZSTD
        if len(body) > MAX_FRAME:
            raise ValueError("frame body of %d bytes is over the limit" % len(body))
        header = (MAGIC, WIRE_VERSION, ftype, flags, len(body), 0,
                  xxhash.xxh3_64_intdigest(body))
        if buf is not None:
            HEADER.pack_into(buf, 0, *header)
            size = HEADER.size + len(body)
            return buf if len(buf) == size else memoryview(buf)[:size]
        return HEADER.pack(*header) + body

    @staticmethod
    def decode_header(buf: bytes, limit: int = MAX_FRAME) -> Header:
        """The header's fields, checked; ``limit`` caps the body (MAX_FRAME, or less where
        the state allows only small frames)."""
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
        if length > limit:
            raise ProtocolError("frame of %d bytes is over the limit of %d" % (length, limit))
        return Header(ftype, flags, length, checksum, limit)

    def decode_body(self, header: Header, body: bytes) -> dict:
        if xxhash.xxh3_64_intdigest(body) != header.checksum:
            raise ProtocolError("%s frame fails its checksum" % TYPE_NAMES[header.type])
        if header.flags & F_ZSTD:
            most = MAX_FIRST_FRAME if header.preauth else MAX_BODY
            try:
                # decompress() trusts a content size in the frame over max_output_size,
                # and without one it needs max_output_size (else it refuses).
                if zstandard.frame_content_size(body) > most:
                    raise ProtocolError("body decompresses past the limit of %d" % most)
                body = self._dctx.decompress(body, max_output_size=most,
                                             allow_extra_data=False)
            except zstandard.ZstdError as e:
                raise ProtocolError("bad zstd body: %s" % e) from None
            if len(body) > most:
                raise ProtocolError("body decompresses past the limit of %d" % most)
        obj = unpack(body, header.preauth)
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
