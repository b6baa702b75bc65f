"""localwire: the splitter <-> agent messages round-trip, and every malformed input is a
ProtocolError (never a struct.error, IndexError or the like)."""

from __future__ import annotations

import json
import socket
import struct
import threading
from typing import List, Tuple

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from formats import localwire as lw
from formats.localwire import ProtocolError, Record
from nbd_plugin.link import send_parts


def write(seq: int, offset: int, data: bytes, gen: int = 1, flags: int = 0) -> Record:
    return Record(seq, 1000 + seq, offset, len(data), gen, lw.KIND_WRITE, flags, data)


def marker(seq: int, kind: int, offset: int = 0, length: int = 0) -> Record:
    return Record(seq, 1000 + seq, offset, length, 1, kind, 0, None)


def message(records: List[Record], watermark_ns: int = 77) -> bytes:
    return b"".join(lw.pack_records(records, watermark_ns))


def split(msg: bytes) -> Tuple[int, bytes]:
    """Header and payload of one whole message, checking the header's length."""
    msg_type, length = lw.unpack_header(msg[:lw.HEADER.size])
    payload = msg[lw.HEADER.size:]
    assert length == len(payload)
    return msg_type, payload


def record_header(seq: int = 1, offset: int = 0, length: int = 0, gen: int = 1,
                  kind: int = lw.KIND_ZERO, flags: int = 0) -> bytes:
    return lw.RECORD.pack(seq, 0, offset, length, gen, kind, flags)


def batch(count: int, *parts: bytes) -> bytes:
    return lw.BATCH.pack(5, count, 0) + b"".join(parts)


# -- formats ---------------------------------------------------------------------------------

def test_header_layout() -> None:
    assert lw.pack_header(lw.MSG_ACK, 16) == b"\x10\x00\x00\x00\x10\x00\x00\x00"


def test_record_layout_is_little_endian_at_the_documented_offsets() -> None:
    r = Record(0x0102, 0x0304, 0x0506, 3, 0x0708, lw.KIND_WRITE, lw.FLAG_FUA, b"abc")
    msg = message([r], watermark_ns=0x0A0B)
    payload = msg[8:]
    assert payload[:16] == struct.pack("<QII", 0x0A0B, 1, 0)
    head = payload[16:56]
    assert head[0:8] == struct.pack("<Q", 0x0102)
    assert head[8:16] == struct.pack("<Q", 0x0304)
    assert head[16:24] == struct.pack("<Q", 0x0506)
    assert head[24:28] == struct.pack("<I", 3)
    assert head[28:32] == struct.pack("<I", 0x0708)
    assert head[32] == lw.KIND_WRITE and head[33] == lw.FLAG_FUA
    assert head[34:40] == bytes(6)
    assert payload[56:] == b"abc"


def test_record_nbytes_counts_header_and_data() -> None:
    assert write(1, 0, b"x" * 100).nbytes == 140
    assert marker(1, lw.KIND_ZERO, 0, 4096).nbytes == 40


# -- round trips -------------------------------------------------------------------------------

def test_records_round_trip() -> None:
    records = [
        write(1, 0, b"hello"),
        marker(2, lw.KIND_ZERO, 4096, 8192),
        marker(3, lw.KIND_TRIM, 65536, 512),
        marker(4, lw.KIND_FLUSH),
        write(5, 10, b"", flags=lw.FLAG_FUA),
        write(6, 1 << 40, b"\0\xff" * 10, gen=9, flags=lw.FLAG_RESYNC | lw.FLAG_INCONSISTENT),
        marker(7, lw.KIND_CONSISTENT),
    ]
    msg_type, payload = split(message(records, watermark_ns=123456789))
    assert msg_type == lw.MSG_RECORDS
    assert lw.unpack_records(payload) == (123456789, records)


def test_empty_batch_round_trips() -> None:
    _, payload = split(message([], watermark_ns=1))
    assert payload == lw.BATCH.pack(1, 0, 0)
    assert lw.unpack_records(payload) == (1, [])


def test_pack_records_returns_header_first_for_sendmsg() -> None:
    parts = lw.pack_records([write(1, 0, b"data")], 0)
    assert parts[0] == lw.pack_header(lw.MSG_RECORDS, 16 + 40 + 4)
    assert parts[-1] == b"data"


@pytest.mark.parametrize("sizes", [
    [0, 8, 0],
    [40, 4096] * 1500,                    # more buffers than one sendmsg takes
    [16, 40, 4 * 1024 * 1024, 40, 3],     # one buffer larger than the socket's
])
def test_send_parts_sends_what_a_join_would(sizes: List[int]) -> None:
    parts = [bytes([i % 251]) * n for i, n in enumerate(sizes)]
    want = b"".join(parts)
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    got = bytearray()

    def drain() -> None:
        while len(got) < len(want):
            got.extend(b.recv(1 << 20))

    reader = threading.Thread(target=drain)
    reader.start()
    send_parts(a, parts)
    reader.join(timeout=30)
    a.close()
    b.close()
    assert bytes(got) == want


def test_ack_round_trip() -> None:
    msg = lw.pack_ack(7, 2**64 - 1)
    msg_type, payload = split(msg)
    assert msg_type == lw.MSG_ACK
    assert lw.unpack_ack(payload) == (7, 2**64 - 1)


def test_json_round_trip() -> None:
    obj = {"disk_id": "d1", "gen": 3, "size": 1 << 30, "nested": {"a": [1, 2]}, "u": "é"}
    msg_type, payload = split(lw.pack_json(lw.MSG_HELLO, obj))
    assert msg_type == lw.MSG_HELLO
    assert lw.unpack_json(payload) == obj


# -- malformed input -------------------------------------------------------------------------

def test_pack_header_refuses_oversize_payloads() -> None:
    with pytest.raises(ValueError):
        lw.pack_header(lw.MSG_STATE, lw.MAX_PAYLOAD + 1)
    assert lw.unpack_header(lw.pack_header(lw.MSG_STATE, lw.MAX_PAYLOAD)) == (
        lw.MSG_STATE, lw.MAX_PAYLOAD)


def test_header_with_oversize_length_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        lw.unpack_header(lw.HEADER.pack(lw.MSG_RECORDS, 0, lw.MAX_PAYLOAD + 1))
    with pytest.raises(ProtocolError):
        lw.unpack_header(b"\x02\x00\x00\x00\xff\xff\xff\xff")


@pytest.mark.parametrize("size", [0, 1, 7, 9])
def test_header_of_the_wrong_size_is_a_protocol_error(size: int) -> None:
    with pytest.raises(ProtocolError):
        lw.unpack_header(b"\x02" * size)


@pytest.mark.parametrize("size", [0, 15, 17])
def test_ack_of_the_wrong_size_is_a_protocol_error(size: int) -> None:
    with pytest.raises(ProtocolError):
        lw.unpack_ack(b"\0" * size)


@pytest.mark.parametrize("payload", [
    b"", b"{", b"not json", b"\xff\xfe\xfd", b"[1, 2]", b"42", b'"s"', b"null",
    b'{"a": 1} trailing',
])
def test_bad_json_is_a_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError):
        lw.unpack_json(payload)


def test_deeply_nested_json_is_a_protocol_error() -> None:
    with pytest.raises(ProtocolError):
        lw.unpack_json(b'{"a":' + b"[" * 100_000 + b"]" * 100_000 + b"}")


def test_records_payload_shorter_than_the_batch_header() -> None:
    for n in range(lw.BATCH.size):
        with pytest.raises(ProtocolError):
            lw.unpack_records(lw.BATCH.pack(0, 0, 0)[:n])


def test_records_truncated_in_a_record_header() -> None:
    head = record_header()
    for n in range(lw.RECORD.size):
        with pytest.raises(ProtocolError, match="record header"):
            lw.unpack_records(batch(1, head[:n]))


def test_count_larger_than_the_records_present() -> None:
    with pytest.raises(ProtocolError):
        lw.unpack_records(batch(2, record_header()))
    with pytest.raises(ProtocolError):
        lw.unpack_records(batch(0xFFFFFFFF, record_header()))


def test_records_truncated_in_write_data() -> None:
    head = record_header(kind=lw.KIND_WRITE, length=10)
    for n in range(10):
        with pytest.raises(ProtocolError, match="record data"):
            lw.unpack_records(batch(1, head, b"d" * n))
    assert lw.unpack_records(batch(1, head, b"d" * 10))[1][0].data == b"d" * 10


def test_write_length_past_the_payload_is_a_protocol_error() -> None:
    head = record_header(kind=lw.KIND_WRITE, length=0xFFFFFFFF)
    with pytest.raises(ProtocolError):
        lw.unpack_records(batch(1, head, b"abc"))


def test_stray_bytes_after_the_records() -> None:
    good = batch(1, record_header())
    assert lw.unpack_records(good)[1] == [Record(1, 0, 0, 0, 1, lw.KIND_ZERO, 0, None)]
    with pytest.raises(ProtocolError, match="stray"):
        lw.unpack_records(good + b"\0")
    with pytest.raises(ProtocolError, match="stray"):
        lw.unpack_records(batch(0, b"x" * 40))


def test_non_write_records_carry_no_data() -> None:
    # A zero record's length is the zeroed range, not bytes in the payload.
    payload = batch(1, record_header(kind=lw.KIND_ZERO, length=1000))
    _, records = lw.unpack_records(payload)
    assert records[0].data is None and records[0].length == 1000


@pytest.mark.parametrize("kind", [0, 6, 17, 255])
def test_unknown_record_kind(kind: int) -> None:
    with pytest.raises(ProtocolError, match="kind"):
        lw.unpack_records(batch(1, record_header(kind=kind)))


# -- properties --------------------------------------------------------------------------------

@st.composite
def records_st(draw) -> List[Record]:
    n = draw(st.integers(0, 8))
    out = []
    for seq in range(1, n + 1):
        kind = draw(st.sampled_from(sorted(lw.KIND_NAMES)))
        offset = draw(st.integers(0, 2**64 - 1))
        flags = draw(st.integers(0, 255))
        gen = draw(st.integers(0, 2**32 - 1))
        time_ns = draw(st.integers(0, 2**64 - 1))
        if kind == lw.KIND_WRITE:
            data = draw(st.binary(max_size=64))
            out.append(Record(seq, time_ns, offset, len(data), gen, kind, flags, data))
        else:
            length = draw(st.integers(0, 2**32 - 1))
            out.append(Record(seq, time_ns, offset, length, gen, kind, flags, None))
    return out


@settings(deadline=None, max_examples=200)
@given(records=records_st(), watermark=st.integers(0, 2**64 - 1))
def test_random_records_round_trip(records: List[Record], watermark: int) -> None:
    _, payload = split(message(records, watermark))
    assert lw.unpack_records(payload) == (watermark, records)


def decodes_or_protocol_error(payload: bytes) -> None:
    try:
        _, records = lw.unpack_records(payload)
    except ProtocolError:
        return
    # What decodes is well formed: it re-encodes to the same records.
    _, again = split(message(records, 0))
    assert lw.unpack_records(again)[1] == records


@settings(deadline=None, max_examples=300)
@given(records=records_st(), data=st.data())
def test_mutated_records_decode_or_raise_protocol_error(records: List[Record],
                                                        data: st.DataObject) -> None:
    _, payload = split(message(records, 1))
    buf = bytearray(payload)
    for _ in range(data.draw(st.integers(1, 4))):
        if not buf:
            break
        i = data.draw(st.integers(0, len(buf) - 1))
        buf[i] = data.draw(st.integers(0, 255))
    decodes_or_protocol_error(bytes(buf))


@settings(deadline=None, max_examples=200)
@given(records=records_st(), data=st.data())
def test_truncated_or_extended_records_raise_protocol_error(records: List[Record],
                                                            data: st.DataObject) -> None:
    _, payload = split(message(records, 1))
    cut = data.draw(st.integers(0, len(payload) - 1))
    with pytest.raises(ProtocolError):
        lw.unpack_records(payload[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=50))
    with pytest.raises(ProtocolError):
        lw.unpack_records(payload + extra)


@settings(deadline=None, max_examples=300)
@given(payload=st.binary(max_size=200))
def test_random_bytes_decode_or_raise_protocol_error(payload: bytes) -> None:
    decodes_or_protocol_error(payload)
    try:
        lw.unpack_ack(payload)
    except ProtocolError:
        pass
    try:
        assert isinstance(lw.unpack_json(payload), dict)
    except ProtocolError:
        pass
    try:
        lw.unpack_header(payload)
    except ProtocolError:
        pass


@settings(deadline=None, max_examples=100)
@given(obj=st.dictionaries(st.text(max_size=10), st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=10),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
    max_leaves=10), max_size=5))
def test_random_json_objects_round_trip(obj: dict) -> None:
    _, payload = split(lw.pack_json(lw.MSG_STATE, obj))
    assert lw.unpack_json(payload) == obj
    assert json.loads(payload) == obj
