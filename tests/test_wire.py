"""agent/frames.py: frames between agents. Round trips with and without zstd, every malformed
frame or body a ProtocolError, and BATCH bodies checked before use."""

from __future__ import annotations

import random
import struct
from typing import Any, List, Tuple

import msgpack
import pytest
import xxhash
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.protocol import batch, frames
from agent.protocol.frames import Codec, Header, ProtocolError
from formats.localwire import (
    FLAG_FUA,
    FLAG_INCONSISTENT,
    FLAG_RESYNC,
    KIND_CONSISTENT,
    KIND_FLUSH,
    KIND_NAMES,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
    Record,
)
from formats.records import JRecord


def raw_frame(body: bytes, ftype: int = frames.T_BATCH, flags: int = 0,
              magic: bytes = frames.MAGIC, version: int = frames.WIRE_VERSION,
              length: int = -1, checksum: int = -1) -> bytes:
    """A frame built by hand, with a right length and checksum unless told otherwise."""
    return frames.HEADER.pack(
        magic, version, ftype, flags, len(body) if length < 0 else length, 0,
        xxhash.xxh3_64_intdigest(body) if checksum < 0 else checksum) + body


def decode(frame: bytes, codec: Codec = None) -> Tuple[Header, dict]:  # type: ignore[assignment]
    codec = codec or Codec()
    header = codec.decode_header(frame[:frames.HEADER.size])
    body = frame[frames.HEADER.size:]
    assert header.length == len(body)
    return header, codec.decode_body(header, body)


def decode_raw_body(body: bytes, flags: int = 0) -> dict:
    return decode(raw_frame(body, flags=flags))[1]


def zstd_frame_claiming(content_size: int, payload: bytes) -> bytes:
    """A zstd frame whose header claims ``content_size`` bytes, holding one raw block."""
    descriptor = (3 << 6) | (1 << 5)  # 8-byte content size, single segment
    block = 1 | (len(payload) << 3)   # last block, raw
    return (struct.pack("<IBQ", 0xFD2FB528, descriptor, content_size)
            + block.to_bytes(3, "little") + payload)


def rec(seq: int, kind: int = KIND_WRITE, data: bytes = b"", offset: int = 0,
        length: int = -1, gen: int = 1, flags: int = 0) -> Record:
    if kind != KIND_WRITE:
        return Record(seq, 10 * seq, offset, max(length, 0), gen, kind, flags, None)
    return Record(seq, 10 * seq, offset, len(data), gen, kind, flags, data)


def jrec(disk: int, r: Record) -> JRecord:
    return JRecord(disk, r.gen, r.seq, r.kind, r.flags, r.offset, r.length, r.time_ns, r.data)


def batch_record(disk: int = 0, kind: int = KIND_ZERO, flags: int = 0, length: int = 0,
                 gen: int = 1, seq: int = 1, offset: int = 0, time_ns: int = 0) -> bytes:
    return batch.BATCH_RECORD.pack(disk, kind, flags, length, gen, seq, offset, time_ns)


def batch_body(recs: bytes, data: bytes = b"") -> dict:
    return {"group": "g", "recs": recs, "data": data, "wall_ns": 1, "mono_ns": 2}


# -- frames ----------------------------------------------------------------------------------

def test_header_layout() -> None:
    frame = Codec().encode(frames.T_ACK, {"seq": 5})
    body = msgpack.packb({"seq": 5})
    assert frame[:4] == b"FRY\x01"
    assert frame[4] == frames.WIRE_VERSION and frame[5] == frames.T_ACK
    assert frame[6:8] == b"\0\0"
    assert frame[8:12] == struct.pack("<I", len(body))
    assert frame[12:16] == b"\0\0\0\0"
    assert frame[16:24] == struct.pack("<Q", xxhash.xxh3_64_intdigest(body))
    assert frame[24:] == body


def test_frame_round_trip_uncompressed() -> None:
    obj = {"group": "g1", "n": 3, "b": b"\0\1", "l": [1, "x", None], "m": {"k": True}}
    header, out = decode(Codec().encode(frames.T_OPEN, obj))
    assert header.type == frames.T_OPEN and header.flags == 0
    assert out == obj


def test_frame_round_trip_compressed() -> None:
    obj = {"data": b"abc" * 10_000, "group": "g"}
    frame = Codec().encode(frames.T_BATCH, obj, compress=True)
    header, out = decode(frame)
    assert header.flags == frames.F_ZSTD
    assert header.length < 2000
    assert out == obj


def test_small_bodies_are_not_compressed() -> None:
    frame = Codec().encode(frames.T_BATCH, {"data": b"a" * 100}, compress=True)
    assert decode(frame)[0].flags == 0


def test_incompressible_bodies_are_sent_plain() -> None:
    noise = random.Random(1).randbytes(4096)
    frame = Codec().encode(frames.T_BATCH, {"data": noise}, compress=True)
    header, out = decode(frame)
    assert header.flags == 0
    assert out == {"data": noise}


def test_one_codec_decodes_many_frames() -> None:
    tx, rx = Codec(), Codec()
    for i in range(5):
        obj = {"i": i, "pad": b"x" * (1000 * i)}
        assert decode(tx.encode(frames.T_BATCH, obj, compress=True), rx)[1] == obj


def test_encode_refuses_a_body_over_max_frame() -> None:
    with pytest.raises(ValueError):
        Codec().encode(frames.T_BATCH, {"data": bytes(frames.MAX_FRAME)})


def test_bad_magic() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        decode(raw_frame(msgpack.packb({}), magic=b"HTTP"))


@pytest.mark.parametrize("version", [0, 2, 255])
def test_bad_version(version: int) -> None:
    with pytest.raises(ProtocolError, match="version"):
        decode(raw_frame(msgpack.packb({}), version=version))


@pytest.mark.parametrize("ftype", [0, 9, 255])
def test_unknown_frame_type(ftype: int) -> None:
    with pytest.raises(ProtocolError, match="type"):
        decode(raw_frame(msgpack.packb({}), ftype=ftype))


@pytest.mark.parametrize("flags", [2, 3, 0x8000])
def test_unknown_frame_flags(flags: int) -> None:
    with pytest.raises(ProtocolError, match="flags"):
        decode(raw_frame(msgpack.packb({}), flags=flags))


def test_oversize_length() -> None:
    ok = raw_frame(b"", length=frames.MAX_FRAME)[:frames.HEADER.size]
    assert Codec.decode_header(ok).length == frames.MAX_FRAME
    for length in (frames.MAX_FRAME + 1, 0xFFFFFFFF):
        with pytest.raises(ProtocolError, match="limit"):
            Codec.decode_header(raw_frame(b"", length=length)[:frames.HEADER.size])


@pytest.mark.parametrize("size", [0, 1, 23, 25])
def test_header_of_the_wrong_size(size: int) -> None:
    with pytest.raises(ProtocolError):
        Codec.decode_header(raw_frame(b"")[:frames.HEADER.size].ljust(size, b"\0")[:size])


def test_checksum_mismatch() -> None:
    frame = bytearray(Codec().encode(frames.T_ACK, {"seq": 5}))
    frame[-1] ^= 1
    with pytest.raises(ProtocolError, match="checksum"):
        decode(bytes(frame))
    frame = bytearray(Codec().encode(frames.T_ACK, {"seq": 5}))
    frame[20] ^= 1  # in the header's checksum field
    with pytest.raises(ProtocolError, match="checksum"):
        decode(bytes(frame))


def test_bad_zstd_body() -> None:
    with pytest.raises(ProtocolError, match="zstd"):
        decode_raw_body(b"not zstd at all", flags=frames.F_ZSTD)
    good = zstandard.ZstdCompressor().compress(msgpack.packb({"a": 1}))
    with pytest.raises(ProtocolError):
        decode_raw_body(good[:-3], flags=frames.F_ZSTD)


def test_zstd_body_with_trailing_bytes() -> None:
    c = zstandard.ZstdCompressor()
    good = c.compress(msgpack.packb({"a": 1}))
    assert decode_raw_body(good, flags=frames.F_ZSTD) == {"a": 1}
    for extra in (b"junk", c.compress(b"\xc0")):
        with pytest.raises(ProtocolError):
            decode_raw_body(good + extra, flags=frames.F_ZSTD)


def test_decompression_bomb_with_its_size_in_the_frame() -> None:
    body = zstandard.ZstdCompressor(level=1).compress(bytes(frames.MAX_BODY + 1))
    assert len(body) < frames.MAX_FRAME
    with pytest.raises(ProtocolError, match="limit"):
        decode_raw_body(body, flags=frames.F_ZSTD)


def test_decompression_bomb_without_its_size_in_the_frame() -> None:
    cctx = zstandard.ZstdCompressor(level=1, write_content_size=False)
    body = cctx.compress(bytes(frames.MAX_BODY + 1))
    with pytest.raises(ProtocolError):
        decode_raw_body(body, flags=frames.F_ZSTD)


def test_zstd_frame_claiming_a_huge_size_is_refused_before_allocating() -> None:
    # Was a MemoryError: decompress() allocates whatever the frame header claims.
    payload = msgpack.packb({"a": 1})
    assert decode_raw_body(zstd_frame_claiming(len(payload), payload), frames.F_ZSTD) == {"a": 1}
    for claimed in (frames.MAX_BODY + 1, 1 << 40, (1 << 64) - 3):
        with pytest.raises(ProtocolError):
            decode_raw_body(zstd_frame_claiming(claimed, payload), flags=frames.F_ZSTD)


def test_body_of_exactly_max_body_is_accepted() -> None:
    inner = msgpack.packb({"d": b""})
    pad = frames.MAX_BODY - len(inner) - 3  # bin 32 has a 5-byte header instead of bin 8's 2
    body = msgpack.packb({"d": bytes(pad)})
    assert len(body) == frames.MAX_BODY
    compressed = zstandard.ZstdCompressor(level=1).compress(body)
    out = decode_raw_body(compressed, flags=frames.F_ZSTD)
    assert len(out["d"]) == pad


@pytest.mark.parametrize("obj", [[1, 2], 7, "text", None, b"bin", 1.5, True])
def test_non_map_bodies(obj: Any) -> None:
    with pytest.raises(ProtocolError, match="not a map"):
        decode(Codec().encode(frames.T_HELLO, obj))


@pytest.mark.parametrize("body", [
    b"",                                          # nothing
    b"\x81\xa1a",                                 # truncated map
    msgpack.packb({"a": 1}) + b"\x00",            # extra data
    msgpack.packb({1: 2}),                        # non-str key
    msgpack.packb({"e": msgpack.ExtType(1, b"x")}),  # ext types are not allowed
    b"\x81\xa1a\xd6\xff\0\0\0\0",                 # timestamp ext
    b"\x81\xa1a\xa1\xff",                         # str that is not UTF-8
    b"\xc1",                                      # reserved byte
    b"\x81\xa1a" + b"\x91" * 100_000 + b"\xc0",   # nested too deep
    msgpack.packb({"s": "x" * (frames.MAX_NAME * 64 + 1)}),
    msgpack.packb({"k%d" % i: i for i in range(frames.MAX_DISKS * 4 + 1)}),
    msgpack.packb({"a": [0] * (frames.MAX_RECORDS * 2 + 1)}),
    b"\x81\xa1a\xdd\xff\xff\xff\xff",             # array claiming 4G items
    b"\x81\xa1a\xc6\xff\xff\xff\xff",             # bin claiming 4 GiB
])
def test_bad_msgpack_bodies(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_raw_body(body)


def test_limits_are_inclusive() -> None:
    obj = {"s": "x" * (frames.MAX_NAME * 64), "a": [0] * (frames.MAX_RECORDS * 2)}
    assert decode_raw_body(msgpack.packb(obj)) == obj


# -- BATCH bodies ---------------------------------------------------------------------------

def test_batch_layout() -> None:
    r = Record(0x0A0B, 0x0C0D, 0x0E0F, 3, 0x1112, KIND_WRITE, FLAG_FUA, b"xyz")
    body = batch.encode_batch("grp", [(0x0102, r)], wall_ns=5, mono_ns=6)
    assert body["group"] == "grp" and body["wall_ns"] == 5 and body["mono_ns"] == 6
    assert body["data"] == b"xyz"
    assert body["recs"] == (struct.pack("<HBBI", 0x0102, KIND_WRITE, FLAG_FUA, 3)
                            + struct.pack("<I", 0x1112) + bytes(4)
                            + struct.pack("<QQQ", 0x0A0B, 0x0E0F, 0x0C0D))


def test_batch_round_trip() -> None:
    records = [
        (0, rec(1, data=b"hello", offset=4096, flags=FLAG_FUA)),
        (1, rec(1, KIND_ZERO, offset=0, length=1 << 20)),
        (0, rec(2, KIND_TRIM, offset=8192, length=512)),
        (0, rec(3, KIND_FLUSH)),
        (1, rec(2, data=b"", offset=7)),
        (1, rec(3, data=b"\xff" * 300, gen=4, flags=FLAG_RESYNC | FLAG_INCONSISTENT)),
        (0, rec(4, KIND_CONSISTENT)),
    ]
    body = batch.encode_batch("g", records, 1, 2)
    assert batch.decode_batch(body) == [jrec(d, r) for d, r in records]


def test_batch_round_trip_through_a_compressed_frame() -> None:
    records = [(2, rec(i, data=bytes([i]) * 1000, offset=i * 1000)) for i in range(1, 20)]
    frame = Codec().encode(frames.T_BATCH, batch.encode_batch("g", records, 1, 2), compress=True)
    header, body = decode(frame)
    assert header.flags == frames.F_ZSTD
    assert batch.decode_batch(body) == [jrec(d, r) for d, r in records]


def test_empty_batch() -> None:
    assert batch.decode_batch(batch_body(b"")) == []


@pytest.mark.parametrize("size", [1, 39, 41, 79])
def test_batch_with_misaligned_records(size: int) -> None:
    with pytest.raises(ProtocolError, match="multiple"):
        batch.decode_batch(batch_body(bytes(size)))


def test_batch_data_too_short() -> None:
    recs = batch_record(kind=KIND_WRITE, length=10) + batch_record(kind=KIND_WRITE, length=5,
                                                                   seq=2)
    assert len(batch.decode_batch(batch_body(recs, b"d" * 15))) == 2
    for n in (0, 9, 14):
        with pytest.raises(ProtocolError, match="shorter"):
            batch.decode_batch(batch_body(recs, b"d" * n))


def test_batch_data_too_long() -> None:
    recs = batch_record(kind=KIND_WRITE, length=10)
    with pytest.raises(ProtocolError, match="no record claims"):
        batch.decode_batch(batch_body(recs, b"d" * 11))
    with pytest.raises(ProtocolError, match="no record claims"):
        batch.decode_batch(batch_body(batch_record(kind=KIND_ZERO, length=10), b"d"))


@pytest.mark.parametrize("kind", [0, 6, 255])
def test_batch_with_an_unknown_kind(kind: int) -> None:
    with pytest.raises(ProtocolError, match="kind"):
        batch.decode_batch(batch_body(batch_record(kind=kind)))


def test_batch_with_an_oversize_write_record() -> None:
    # Checked before the data is looked at: no data follows in this body.
    with pytest.raises(ProtocolError, match="limit"):
        batch.decode_batch(batch_body(batch_record(kind=KIND_WRITE, length=frames.MAX_RECORD + 1)))
    with pytest.raises(ProtocolError, match="limit"):
        batch.decode_batch(batch_body(batch_record(kind=KIND_WRITE, length=0xFFFFFFFF)))


def test_zero_and_trim_records_carry_long_ranges() -> None:
    recs = (batch_record(kind=KIND_ZERO, length=0xFFFFFFFF)
            + batch_record(kind=KIND_TRIM, length=frames.MAX_RECORD + 1, seq=2))
    out = batch.decode_batch(batch_body(recs))
    assert [(r.kind, r.length, r.data) for r in out] == [
        (KIND_ZERO, 0xFFFFFFFF, None), (KIND_TRIM, frames.MAX_RECORD + 1, None)]


def test_batch_with_too_many_records() -> None:
    one = batch_record()
    assert len(batch.decode_batch(batch_body(one * frames.MAX_RECORDS))) == frames.MAX_RECORDS
    with pytest.raises(ProtocolError, match="more than"):
        batch.decode_batch(batch_body(one * (frames.MAX_RECORDS + 1)))


def test_batch_with_missing_or_mistyped_fields() -> None:
    with pytest.raises(ProtocolError, match="missing"):
        batch.decode_batch({"data": b""})
    with pytest.raises(ProtocolError, match="missing"):
        batch.decode_batch({"recs": b""})
    with pytest.raises(ProtocolError, match="wrong type"):
        batch.decode_batch({"recs": "text", "data": b""})
    with pytest.raises(ProtocolError, match="wrong type"):
        batch.decode_batch({"recs": b"", "data": [1]})


# -- field checks ----------------------------------------------------------------------------

def test_field_returns_values_of_the_right_type() -> None:
    obj = {"n": 3, "s": "x", "b": b"y", "l": [1], "t": True}
    assert frames.field(obj, "n", int) == 3
    assert frames.field(obj, "s", str) == "x"
    assert frames.field(obj, "b", bytes) == b"y"
    assert frames.field(obj, "l", list) == [1]
    assert frames.field(obj, "t", bool) is True
    assert frames.field(obj, "s", (str, bytes)) == "x"


def test_field_missing_or_of_the_wrong_type() -> None:
    obj = {"n": 3, "s": "x", "t": True, "none": None}
    with pytest.raises(ProtocolError, match="missing"):
        frames.field(obj, "absent", int)
    with pytest.raises(ProtocolError, match="wrong type"):
        frames.field(obj, "s", int)
    with pytest.raises(ProtocolError, match="wrong type"):
        frames.field(obj, "n", str)
    with pytest.raises(ProtocolError, match="wrong type"):
        frames.field(obj, "none", int)


def test_field_does_not_take_a_bool_for_an_int() -> None:
    with pytest.raises(ProtocolError, match="wrong type"):
        frames.field({"t": True}, "t", int)
    with pytest.raises(ProtocolError, match="wrong type"):
        frames.field({"t": False}, "t", int)


def test_name_field_accepts_plain_names() -> None:
    for name in ("g1", "vm-disk_0.img", "a" * frames.MAX_NAME, "é", "a.b", "x..y"):
        assert frames.name_field({"k": name}, "k") == name


@pytest.mark.parametrize("name", [
    "", "a" * (frames.MAX_NAME + 1), "a/b", "/abs", "..", ".hidden", "a\0b", "a\nb",
])
def test_name_field_refuses_bad_names(name: str) -> None:
    with pytest.raises(ProtocolError, match="not a valid name"):
        frames.name_field({"k": name}, "k")


def test_name_field_checks_the_type_first() -> None:
    with pytest.raises(ProtocolError, match="wrong type"):
        frames.name_field({"k": b"bytes"}, "k")
    with pytest.raises(ProtocolError, match="missing"):
        frames.name_field({}, "k")


# -- properties --------------------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1)
    | st.floats(allow_nan=False) | st.text(max_size=20) | st.binary(max_size=40),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4),
    max_leaves=12)
msgpack_maps = st.dictionaries(st.text(max_size=8), msgpack_values, max_size=6)


@settings(deadline=None, max_examples=150)
@given(obj=msgpack_maps, ftype=st.sampled_from(sorted(frames.TYPE_NAMES)),
       compress=st.booleans(), pad=st.integers(0, 3000))
def test_random_frames_round_trip(obj: dict, ftype: int, compress: bool, pad: int) -> None:
    obj = dict(obj, pad=b"p" * pad)
    header, out = decode(Codec().encode(ftype, obj, compress=compress))
    assert header.type == ftype
    assert out == obj


def decodes_or_protocol_error(header: Header, body: bytes) -> None:
    try:
        out = Codec().decode_body(header, body)
    except ProtocolError:
        return
    assert isinstance(out, dict)


@settings(deadline=None, max_examples=300)
@given(buf=st.binary(max_size=40))
def test_random_bytes_into_decode_header(buf: bytes) -> None:
    try:
        header = Codec.decode_header(buf)
    except ProtocolError:
        return
    assert header.type in frames.TYPE_NAMES and header.length <= frames.MAX_FRAME


@settings(deadline=None, max_examples=300)
@given(body=st.binary(max_size=300), flags=st.sampled_from([0, frames.F_ZSTD]))
def test_random_bytes_into_decode_body(body: bytes, flags: int) -> None:
    header = Header(frames.T_BATCH, flags, len(body), xxhash.xxh3_64_intdigest(body))
    decodes_or_protocol_error(header, body)


@settings(deadline=None, max_examples=300)
@given(obj=msgpack_maps, compress=st.booleans(), data=st.data())
def test_mutated_frames_decode_or_raise_protocol_error(obj: dict, compress: bool,
                                                       data: st.DataObject) -> None:
    frame = bytearray(Codec().encode(frames.T_OPEN, dict(obj, pad=b"q" * 600),
                                     compress=compress))
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(frame) - 1))
        frame[i] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        frame = frame[:data.draw(st.integers(frames.HEADER.size, len(frame)))]
    try:
        header = Codec.decode_header(bytes(frame[:frames.HEADER.size]))
    except ProtocolError:
        return
    body = bytes(frame[frames.HEADER.size:])
    decodes_or_protocol_error(header, body)
    # With the checksum fixed up, the body reaches the decompressor and msgpack.
    fixed = Header(header.type, header.flags, len(body), xxhash.xxh3_64_intdigest(body))
    decodes_or_protocol_error(fixed, body)


@st.composite
def batch_records(draw) -> List[Tuple[int, Record]]:
    out = []
    for seq in range(1, draw(st.integers(0, 6)) + 1):
        disk = draw(st.integers(0, 65535))
        kind = draw(st.sampled_from(sorted(KIND_NAMES)))
        flags = draw(st.integers(0, 255))
        offset = draw(st.integers(0, 2**64 - 1))
        gen = draw(st.integers(0, 2**32 - 1))
        if kind == KIND_WRITE:
            out.append((disk, rec(seq, data=draw(st.binary(max_size=50)), offset=offset,
                                  gen=gen, flags=flags)))
        else:
            out.append((disk, rec(seq, kind, offset=offset, gen=gen, flags=flags,
                                  length=draw(st.integers(0, 2**32 - 1)))))
    return out


@settings(deadline=None, max_examples=200)
@given(records=batch_records())
def test_random_batches_round_trip(records: List[Tuple[int, Record]]) -> None:
    body = batch.encode_batch("g", records, 1, 2)
    assert batch.decode_batch(body) == [jrec(d, r) for d, r in records]


@settings(deadline=None, max_examples=300)
@given(records=batch_records(), data=st.data())
def test_mutated_batches_decode_or_raise_protocol_error(
        records: List[Tuple[int, Record]], data: st.DataObject) -> None:
    body = batch.encode_batch("g", records, 1, 2)
    recs, payload = bytearray(body["recs"]), bytearray(body["data"])
    for buf in (recs, payload):
        if buf and data.draw(st.booleans()):
            buf[data.draw(st.integers(0, len(buf) - 1))] = data.draw(st.integers(0, 255))
    recs = recs[:data.draw(st.integers(0, len(recs)))] + data.draw(st.binary(max_size=3))
    payload = payload[:data.draw(st.integers(0, len(payload)))]
    try:
        out = batch.decode_batch(batch_body(bytes(recs), bytes(payload)))
    except ProtocolError:
        return
    assert all(r.kind in KIND_NAMES or r.kind == frames.KIND_SEEDED for r in out)
    assert all(r.length <= frames.MAX_RECORD for r in out if r.kind == KIND_WRITE)
    assert sum(r.length if r.kind == KIND_WRITE else batch.SEEDED_DATA
               for r in out if r.data is not None) == len(payload)
