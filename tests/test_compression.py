"""Adaptive compression of BATCH frames (agent/protocol/compression.py) and the one-copy
batch frame (``messages.Batch.frame``): what the target takes is the same whichever way a
batch was sent, compressed or not."""

from __future__ import annotations

import logging
import random

import pytest

from agent.protocol import compression, frames, messages
from agent.protocol.compression import Policy
from agent.protocol.pair import ConnectionPair, feed
from formats.localwire import KIND_TRIM, KIND_WRITE, Record
from tests.test_protocol import handshake

NOISE = random.Random(7).randbytes(1 << 20)
TEXT = b"".join(b"line %06d: the quick brown fox jumps over the lazy dog\n" % i
                for i in range(20000))


def records(data: bytes, piece: int = 64 * 1024) -> list:
    out = [(i % 2, Record(i + 1, 5, i * piece, min(piece, len(data) - i * piece), 1,
                          KIND_WRITE, 0, data[i * piece:(i + 1) * piece]))
           for i in range((len(data) + piece - 1) // piece)]
    out.append((0, Record(len(out) + 1, 6, 0, 4096, 1, KIND_TRIM, 0, None)))
    return out


def received(frame: bytes) -> list:
    """The records a target session takes from ``frame``."""
    pair = ConnectionPair()
    handshake(pair)
    pair.source.sent_frame(frames.T_BATCH, frame)
    (got,) = feed(pair.target, bytes(frame))
    return [(r.disk, r.kind, r.seq, r.offset, r.length, r.data and bytes(r.data))
            for r in got.records]


def as_before(items: list) -> tuple:
    """The frame the old path made (msgpack of the whole body) and what the target took."""
    frame = frames.Codec(policy=Policy("off")).encode(
        frames.T_BATCH, messages.Batch("g1", items, 1, 1).body())
    return frame, received(frame)


@pytest.mark.parametrize("mode", ["auto", "zstd", "off"])
def test_an_incompressible_batch_goes_uncompressed_and_is_taken_identically(mode: str) -> None:
    items = records(NOISE)
    codec = frames.Codec(policy=Policy(mode))
    frame = messages.Batch("g1", items, 1, 1).frame(codec)
    header = frames.Codec.decode_header(bytes(frame[:frames.HEADER.size]))
    assert header.flags == 0
    old_frame, old = as_before(items)
    assert received(frame) == old
    assert len(frame) == len(old_frame)  # the same msgpack map, its keys in another order
    assert codec.policy.sampled_out == (1 if mode == "auto" else 0)  # a sample, not a core


@pytest.mark.parametrize("mode", ["auto", "zstd"])
def test_a_compressible_batch_is_still_compressed(mode: str) -> None:
    items = records(TEXT)
    codec = frames.Codec(policy=Policy(mode))
    frame = messages.Batch("g1", items, 1, 1).frame(codec)
    assert frames.Codec.decode_header(bytes(frame[:frames.HEADER.size])).flags == frames.F_ZSTD
    assert len(frame) < len(TEXT) // 3
    assert received(frame) == as_before(items)[1]
    assert codec.bytes_out == len(frame) - frames.HEADER.size


def test_off_never_compresses() -> None:
    frame = messages.Batch("g1", records(TEXT), 1, 1).frame(frames.Codec(policy=Policy("off")))
    assert frames.Codec.decode_header(bytes(frame[:frames.HEADER.size])).flags == 0


def test_zstd_mode_backs_off_after_a_body_that_does_not_shrink() -> None:
    policy = Policy("zstd")
    body = memoryview(NOISE)
    assert policy.level_for(body) == compression.LEVEL
    assert not policy.compressed(compression.LEVEL, len(NOISE), len(NOISE), 0.001)
    assert [policy.level_for(body) for _ in range(compression.BACKOFF)] == \
        [None] * compression.BACKOFF
    assert policy.level_for(body) == compression.LEVEL


def test_auto_picks_the_level_by_link_and_cpu() -> None:
    policy = Policy("auto")
    body = memoryview(TEXT)
    assert policy.level_for(body) == compression.LEVEL  # nothing measured yet
    policy.compressed(compression.LEVEL, 100 << 20, 30 << 20, 1.0)  # zstd: 100 MiB/s
    policy.sent(300 << 20, 1.0)  # a link faster than zstd: still level 1
    assert policy.level_for(body) == compression.LEVEL
    slow = Policy("auto")
    slow.compressed(compression.LEVEL, 100 << 20, 30 << 20, 1.0)
    slow.sent(1 << 20, 1.0)  # 1 MiB/s: a WAN, or a bandwidth limit
    assert slow.level_for(body) == compression.LEVEL_SLOW
    assert Policy("auto").level_for(memoryview(b"x" * compression.MIN_BODY)) is None


def test_frames_at_every_level_decode() -> None:
    for level in (-1, compression.LEVEL, compression.LEVEL_SLOW):
        policy = Policy("auto")
        policy.level = lambda level=level: level  # type: ignore[method-assign]
        items = records(TEXT[:300_000])
        frame = messages.Batch("g1", items, 1, 1).frame(frames.Codec(policy=policy))
        assert received(frame) == as_before(items)[1]


def test_large_maps_and_small_bins_have_the_msgpack_headers_msgpack_gives() -> None:
    fields = {"k%d" % i: i for i in range(20)}
    for n in (0, 10, 300, 70000):
        frame = frames.Codec(policy=Policy("off")).encode_with_bin(
            frames.T_BATCH, fields, "data", [b"a" * n])
        body = bytes(frame[frames.HEADER.size:])
        assert body == frames.pack(dict(fields, data=b"a" * n))


def test_modes_from_the_environment(caplog: pytest.LogCaptureFixture) -> None:
    assert compression.mode_from_env({}) == "auto"
    assert compression.mode_from_env({"FERRY_COMPRESSION": "off"}) == "off"
    with caplog.at_level(logging.WARNING, logger="ferry.wire"):
        assert compression.mode_from_env({"FERRY_COMPRESSION": "lz4"}) == "auto"
    assert "FERRY_COMPRESSION='lz4' is not one of auto, zstd, off" in caplog.text
    with pytest.raises(ValueError, match="compression mode 'lz4'"):
        Policy("lz4")


def test_one_codec_reuses_its_buffer_between_frames() -> None:
    """A compressed frame leaves the codec's buffer for the next one; a smaller frame sent
    as it is then is a view of that buffer's start, and takes it along."""
    codec = frames.Codec(policy=Policy("auto"))
    big, small = records(TEXT), records(NOISE[:300_000])
    first = messages.Batch("g1", big, 1, 1).frame(codec)
    assert received(first) == as_before(big)[1]
    second = messages.Batch("g1", small, 1, 1).frame(codec)
    assert isinstance(second, memoryview)
    assert received(bytes(second)) == as_before(small)[1]
    third = messages.Batch("g1", big, 1, 1).frame(codec)
    assert received(third) == as_before(big)[1]
    assert received(bytes(second)) == as_before(small)[1]  # not overwritten by the third


def test_a_sample_that_misjudges_the_stream_is_checked_and_then_distrusted() -> None:
    policy = Policy("auto")
    body = memoryview(NOISE)  # its sample does not shrink
    assert [policy.level_for(body) for _ in range(compression.BACKOFF - 1)] == \
        [None] * (compression.BACKOFF - 1)
    assert policy.sampled_out == compression.BACKOFF - 1
    assert policy.level_for(body) == compression.LEVEL  # the check: the whole body
    assert not policy.compressed(compression.LEVEL, len(NOISE), len(NOISE), 0.01)
    assert policy.level_for(body) is None  # the sample was right: sampling goes on
    for _ in range(compression.BACKOFF - 2):
        policy.level_for(body)
    assert policy.level_for(body) == compression.LEVEL  # the next check
    assert policy.compressed(compression.LEVEL, len(NOISE), len(NOISE) // 2, 0.01)
    before = policy.sampled_out
    assert [policy.level_for(body) for _ in range(compression.DISTRUST)] == \
        [compression.LEVEL] * compression.DISTRUST  # compressed whole, no sample
    assert policy.sampled_out == before
    assert policy.level_for(body) is None  # then the sample is asked again
