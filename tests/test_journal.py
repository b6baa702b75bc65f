"""agent/target/journal.py: append-only segments, torn tails cut at open, corruption inside the
journal reported, old segments dropped but never the one being written."""

from __future__ import annotations

import contextlib
import os
import resource
import shutil
import signal
import struct
from pathlib import Path
from typing import Iterator, List, Tuple

import pytest
import xxhash
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.target.journal import MAGIC, RECORD, Journal, JournalCorrupt, JRecord, encode_header
from formats.localwire import (
    FLAG_INCONSISTENT,
    KIND_CONSISTENT,
    KIND_FLUSH,
    KIND_NAMES,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
)


def w(seq: int, data: bytes, offset: int = 0, disk: int = 0, gen: int = 1,
      flags: int = 0) -> JRecord:
    return JRecord(disk, gen, seq, KIND_WRITE, flags, offset, len(data), 1000 + seq, data)


def m(seq: int, kind: int, offset: int = 0, length: int = 0, disk: int = 0) -> JRecord:
    return JRecord(disk, 1, seq, kind, 0, offset, length, 1000 + seq, None)


def size_of(r: JRecord) -> int:
    return RECORD.size + (r.length if r.kind == KIND_WRITE else 0)


def read_all(j: Journal) -> List[JRecord]:
    return [r for r, _ in j.read_from(j.start)]


def seg_path(directory: Path, segno: int) -> Path:
    return directory / ("seg-%016d.fjr" % segno)


def reopen(j: Journal, segment_max: int = 0) -> Journal:
    j.close()
    return Journal(j.directory, segment_max or j.segment_max)


def three_records() -> List[JRecord]:
    return [w(1, b"first" * 3), m(2, KIND_ZERO, 4096, 8192), w(3, b"the torn one" * 3)]


# -- format ------------------------------------------------------------------------------------

def test_record_layout() -> None:
    r = JRecord(0x0102, 0x03040506, 0x0708, KIND_WRITE, FLAG_INCONSISTENT, 0x090A, 3,
                0x0B0C, b"abc")
    head = encode_header(r)
    assert len(head) == 48
    assert head[:4] == MAGIC
    assert head[4] == KIND_WRITE and head[5] == FLAG_INCONSISTENT
    assert head[6:8] == struct.pack("<H", 0x0102)
    assert head[8:12] == struct.pack("<I", 0x03040506)
    assert head[12:16] == struct.pack("<I", 3)
    assert head[16:24] == struct.pack("<Q", 0x0708)
    assert head[24:32] == struct.pack("<Q", 0x090A)
    assert head[32:40] == struct.pack("<Q", 0x0B0C)
    assert head[40:48] == struct.pack("<Q", xxhash.xxh3_64_intdigest(head[:40] + b"abc"))


def test_new_journal_has_one_empty_segment(tmp_path: Path) -> None:
    j = Journal(str(tmp_path / "j"))
    assert j.segments() == [1]
    assert j.start == (1, 0) and j.end == (1, 0)
    assert seg_path(tmp_path / "j", 1).stat().st_size == 0
    assert read_all(j) == []
    assert j.append([]) == (1, 0)
    j.close()


# -- append and read ---------------------------------------------------------------------------

def test_append_and_read_back(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    records = [w(1, b"hello", 512), m(2, KIND_ZERO, 0, 1 << 30), m(3, KIND_TRIM, 7, 9),
               m(4, KIND_FLUSH), m(5, KIND_CONSISTENT), w(6, b"", 3), w(7, b"x" * 1000)]
    end = j.append(records)
    assert end == (1, sum(size_of(r) for r in records))
    assert j.end == end
    got = list(j.read_from(j.start))
    assert [r for r, _ in got] == records
    positions = [p for _, p in got]
    assert positions[-1] == end
    # Reading from any returned position gives the records after it.
    for i, pos in enumerate(positions):
        assert [r for r, _ in j.read_from(pos)] == records[i + 1:]
    j.close()


def test_read_from_stops_at_stop(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    records = [w(i, bytes([i]) * 10) for i in range(1, 6)]
    j.append(records[:2])
    mid = j.end
    j.append(records[2:])
    assert [r for r, _ in j.read_from(j.start, stop=mid)] == records[:2]
    assert [r for r, _ in j.read_from(mid)] == records[2:]
    assert list(j.read_from(mid, stop=mid)) == []
    j.close()


def test_segments_roll_at_segment_max_and_read_across_them(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=200)
    records = [w(i, bytes([i]) * 60, offset=i) for i in range(1, 13)]  # 108 bytes each
    ends = [j.append([r]) for r in records]
    # A segment takes records until it reaches 200 bytes: two records each.
    assert j.segments() == [1, 2, 3, 4, 5, 6]
    assert ends[:4] == [(1, 108), (1, 216), (2, 108), (2, 216)]
    for s in j.segments():
        assert seg_path(tmp_path, s).stat().st_size == 216
    assert read_all(j) == records
    for i, end in enumerate(ends):
        assert [r for r, _ in j.read_from(end)] == records[i + 1:]
    # Positions name the segment the record is in; a position at a segment's very end
    # continues in the next segment.
    assert [p for _, p in j.read_from(j.start)] == ends
    assert [r for r, _ in j.read_from((3, 0), stop=(4, 108))] == records[4:7]
    assert j.size() == 12 * 108
    j.close()


def test_a_batch_is_never_split_across_segments(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=100)
    batch = [w(i, b"z" * 100) for i in range(1, 4)]
    assert j.append(batch) == (1, 3 * 148)
    assert j.append([w(4, b"y")]) == (2, 49)
    assert read_all(j) == [*batch, w(4, b"y")]
    j.close()


def test_reopen_keeps_every_record_and_appends_after_them(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=150)
    records = [w(i, bytes([i]) * 50) for i in range(1, 8)]
    for r in records:
        j.append([r])
    segments, end = j.segments(), j.end
    j = reopen(j)
    assert j.dropped_tail == 0
    assert j.segments() == segments and j.end == end
    assert read_all(j) == records
    more = w(8, b"after")
    j.append([more])
    j = reopen(j)
    assert read_all(j) == [*records, more]
    j.close()


def test_reopen_after_a_crash_that_left_an_empty_new_segment(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=10)
    j.append([w(1, b"one")])
    j.close()
    seg_path(tmp_path, 2).write_bytes(b"")  # made by a roll, then the crash
    j = Journal(str(tmp_path), segment_max=10)
    assert j.segments() == [1, 2] and j.end == (2, 0)
    j.append([w(2, b"two")])
    assert read_all(j) == [w(1, b"one"), w(2, b"two")]
    j.close()


def test_files_that_are_not_segments_are_left_alone(tmp_path: Path) -> None:
    (tmp_path / "seg-1.fjr").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_bytes(b"junk")
    j = Journal(str(tmp_path))
    assert j.segments() == [1]
    j.append([w(1, b"x")])
    assert read_all(j) == [w(1, b"x")]
    j.close()
    assert (tmp_path / "seg-1.fjr").read_bytes() == b"junk"


# -- torn tails and corruption ------------------------------------------------------------------

def make_torn_base(directory: Path) -> Tuple[List[JRecord], int, int]:
    """A journal of two segments; the last ends with the record to be torn.
    Returns the records, the last segment's number and the torn record's start."""
    j = Journal(str(directory), segment_max=60)
    records = three_records()
    j.append([records[0]])           # segment 1 (63 + 48 > 60: full)
    j.append([records[1]])           # segment 2
    start = j.end[1]
    segno = j.end[0]
    j.close()
    assert segno == 2
    # The tail: written, never acked (a crash before append's fdatasync returned).
    with open(seg_path(directory, segno), "ab") as f:
        f.write(raw(records[2]))
    return records, segno, start


def raw(r: JRecord) -> bytes:
    return encode_header(r) + (r.data or b"")


def test_torn_tail_at_every_offset_is_cut_and_appends_continue(tmp_path: Path) -> None:
    base = tmp_path / "base"
    records, segno, start = make_torn_base(base)
    whole = size_of(records[2])
    for cut in range(1, whole):
        d = tmp_path / ("cut%d" % cut)
        shutil.copytree(base, d)
        os.truncate(seg_path(d, segno), start + cut)
        j = Journal(str(d), segment_max=60)
        assert j.dropped_tail == cut, cut
        assert seg_path(d, segno).stat().st_size == start
        assert j.end == (segno, start)
        assert read_all(j) == records[:2]
        again = w(3, b"written again")
        assert j.append([again]) == (segno, start + size_of(again))
        j = reopen(j)
        assert j.dropped_tail == 0
        assert read_all(j) == [*records[:2], again]
        j.close()
        shutil.rmtree(d)


def test_a_cut_at_a_record_boundary_is_not_torn(tmp_path: Path) -> None:
    records, segno, start = make_torn_base(tmp_path)
    os.truncate(seg_path(tmp_path, segno), start)
    j = Journal(str(tmp_path), segment_max=60)
    assert j.dropped_tail == 0
    assert read_all(j) == records[:2]
    j.close()


def test_flipped_byte_in_the_tail_record_drops_it(tmp_path: Path) -> None:
    base = tmp_path / "base"
    records, segno, start = make_torn_base(base)
    whole = size_of(records[2])
    for i in range(whole):
        d = tmp_path / ("flip%d" % i)
        shutil.copytree(base, d)
        path = seg_path(d, segno)
        buf = bytearray(path.read_bytes())
        buf[start + i] ^= 0xFF
        path.write_bytes(bytes(buf))
        j = Journal(str(d), segment_max=60)
        assert j.dropped_tail == whole, i
        assert read_all(j) == records[:2]
        j.close()
        shutil.rmtree(d)


def test_garbage_after_the_last_record_is_dropped(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    j.append([w(1, b"good")])
    end = j.end
    j.close()
    with open(seg_path(tmp_path, 1), "ab") as f:
        f.write(b"\0" * 1000)
    j = Journal(str(tmp_path))
    assert j.dropped_tail == 1000 and j.end == end
    assert read_all(j) == [w(1, b"good")]
    j.close()


def test_flipped_byte_inside_a_closed_segment_is_corruption(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=100)
    first = [w(1, b"a" * 30), w(2, b"b" * 30)]        # segment 1
    later = [w(3, b"c" * 60), w(4, b"d" * 60)]        # segment 2
    j.append(first)
    mid = j.end
    j.append(later)
    assert j.segments() == [1, 2]
    j.close()
    path = seg_path(tmp_path, 1)
    buf = bytearray(path.read_bytes())
    buf[RECORD.size + 10] ^= 0x01  # inside the data of record 1
    path.write_bytes(bytes(buf))
    j = Journal(str(tmp_path), segment_max=100)
    assert j.dropped_tail == 0  # only the last segment is scanned at open
    with pytest.raises(JournalCorrupt, match="byte 0"):
        read_all(j)
    # Records after the damage, in the same segment or later, are still readable.
    assert [r for r, _ in j.read_from((1, size_of(first[0])))] == first[1:] + later
    assert [r for r, _ in j.read_from((2, 0))] == later
    assert [r for r, _ in j.read_from(mid)] == later
    j.close()


def test_damaged_second_record_of_a_closed_segment_reports_its_offset(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=100)
    j.append([w(1, b"a" * 30), w(2, b"b" * 30)])
    j.append([w(3, b"c")])
    j.close()
    path = seg_path(tmp_path, 1)
    buf = bytearray(path.read_bytes())
    buf[78] ^= 0x01  # the magic of record 2
    path.write_bytes(bytes(buf))
    j = Journal(str(tmp_path), segment_max=100)
    it = j.read_from(j.start)
    assert next(it)[0] == w(1, b"a" * 30)
    with pytest.raises(JournalCorrupt, match="byte 78"):
        next(it)
    j.close()


@contextlib.contextmanager
def file_size_limit(limit: int) -> Iterator[None]:
    """Writes past ``limit`` bytes fail with EFBIG (a write across it is cut short first),
    like a disk filling up in the middle of a batch."""
    old = resource.getrlimit(resource.RLIMIT_FSIZE)
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old)
        signal.signal(signal.SIGXFSZ, old_handler)


def test_a_failed_append_leaves_no_partial_batch(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    first = w(1, b"a" * 100)
    j.append([first])
    end = j.end
    with file_size_limit(end[1] + 52), pytest.raises(OSError):
        j.append([w(2, b"b" * 100), w(3, b"c" * 100)])
    assert j.end == end
    assert seg_path(tmp_path, 1).stat().st_size == end[1]
    # The next append lands where the failed one would have, and survives a reopen.
    again = w(2, b"B" * 100)
    assert j.append([again]) == (1, end[1] + size_of(again))
    assert read_all(j) == [first, again]
    j = reopen(j)
    assert j.dropped_tail == 0
    assert read_all(j) == [first, again]
    j.close()


# -- dropping old segments ---------------------------------------------------------------------

def test_drop_before_deletes_older_segments(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=100)
    records = [w(i, bytes([i]) * 60) for i in range(1, 6)]  # one record a segment
    for r in records:
        j.append([r])
    assert j.segments() == [1, 2, 3, 4, 5]
    j.drop_before(3)
    assert j.segments() == [3, 4, 5]
    assert j.start == (3, 0)
    assert not seg_path(tmp_path, 1).exists() and not seg_path(tmp_path, 2).exists()
    assert read_all(j) == records[2:]
    assert [r for r, _ in j.read_from((1, 50))] == records[2:]  # a dropped position
    j.drop_before(3)
    assert j.segments() == [3, 4, 5]
    j = reopen(j)
    assert j.segments() == [3, 4, 5] and read_all(j) == records[2:]
    j.close()


def test_drop_before_never_deletes_the_segment_being_written(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=100)
    records = [w(i, bytes([i]) * 60) for i in range(1, 4)]
    for r in records:
        j.append([r])
    j.drop_before(1000)
    assert j.segments() == [3]
    assert seg_path(tmp_path, 3).exists()
    assert read_all(j) == records[2:]
    j.append([w(4, b"next")])  # into segment 3: full, so it rolls to 4
    assert j.segments() == [3, 4]
    assert read_all(j) == [records[2], w(4, b"next")]
    j.drop_before(1000)
    assert j.segments() == [4]
    j = reopen(j)
    assert read_all(j) == [w(4, b"next")]
    j.close()


# -- properties --------------------------------------------------------------------------------

@st.composite
def jrecords(draw, seq: int) -> JRecord:
    kind = draw(st.sampled_from(sorted(KIND_NAMES)))
    disk = draw(st.integers(0, 65535))
    gen = draw(st.integers(0, 2**32 - 1))
    flags = draw(st.integers(0, 255))
    offset = draw(st.integers(0, 2**64 - 1))
    time_ns = draw(st.integers(0, 2**64 - 1))
    if kind == KIND_WRITE:
        data = draw(st.binary(max_size=80))
        return JRecord(disk, gen, seq, kind, flags, offset, len(data), time_ns, data)
    return JRecord(disk, gen, seq, kind, flags, offset, draw(st.integers(0, 2**32 - 1)),
                   time_ns, None)


@st.composite
def batches(draw) -> List[List[JRecord]]:
    out = []
    seq = 1
    for _ in range(draw(st.integers(1, 8))):
        batch = []
        for _ in range(draw(st.integers(1, 4))):
            batch.append(draw(jrecords(seq)))
            seq += 1
        out.append(batch)
    return out


@settings(deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=batches(), segment_max=st.integers(1, 400), data=st.data())
def test_random_appends_read_back_in_order_across_rolls_and_reopens(
        tmp_path: Path, batches: List[List[JRecord]], segment_max: int,
        data: st.DataObject) -> None:
    d = tmp_path / "j"
    shutil.rmtree(d, ignore_errors=True)
    j = Journal(str(d), segment_max=segment_max)
    written: List[JRecord] = []
    for batch in batches:
        end = j.append(batch)
        written.extend(batch)
        assert end == j.end
        if data.draw(st.booleans()):
            j = reopen(j)
            assert j.end == end and j.dropped_tail == 0
    got = list(j.read_from(j.start))
    assert [r for r, _ in got] == written
    assert got[-1][1] == j.end
    # Every segment but the last reached segment_max; none holds a record past it.
    for s in j.segments()[:-1]:
        assert seg_path(d, s).stat().st_size >= segment_max
    # Starting from any position returns the rest.
    k = data.draw(st.integers(0, len(got) - 1))
    assert [r for r, _ in j.read_from(got[k][1])] == written[k + 1:]
    j.close()


@settings(deadline=None, max_examples=60,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=batches(), data=st.data())
def test_random_tail_damage_keeps_every_earlier_record(
        tmp_path: Path, batches: List[List[JRecord]], data: st.DataObject) -> None:
    d = tmp_path / "j"
    shutil.rmtree(d, ignore_errors=True)
    j = Journal(str(d))
    written: List[JRecord] = []
    for batch in batches:
        j.append(batch)
        written.extend(batch)
    j.close()
    path = seg_path(d, 1)
    # The last record as a crash before its ack left it: past the acked mark.
    buf = bytearray(path.read_bytes())
    (d / "acked").write_bytes(b"")
    assert buf.endswith(raw(written[-1]))
    buf = bytearray(path.read_bytes())
    last = written[-1]
    start = len(buf) - size_of(last)
    if data.draw(st.booleans()):
        cut = data.draw(st.integers(start, len(buf) - 1))
        buf = buf[:cut]
        damage = len(buf) - start
    else:
        i = data.draw(st.integers(start, len(buf) - 1))
        buf[i] ^= data.draw(st.integers(1, 255))
        damage = len(buf) - start
    path.write_bytes(bytes(buf))
    j = Journal(str(d))
    assert j.dropped_tail == damage
    assert read_all(j) == written[:-1]
    j.append([last])
    j = reopen(j)
    assert read_all(j) == written
    j.close()


@pytest.mark.parametrize("limit", [None, 1000, 7])
def test_write_all_writes_every_part_in_order(tmp_path, monkeypatch, limit) -> None:
    """Over IOV_MAX parts, and writev calls that write only part of what they were given."""
    import os as _os

    from agent.target import journal as journal_mod

    real = _os.writev
    if limit is not None:
        monkeypatch.setattr(journal_mod.os, "writev",
                            lambda fd, bufs: real(fd, _clip(list(bufs), limit)))
    parts = [bytes([i % 251]) * (i % 13) for i in range(3000)] + [b"tail" * 1000]
    path = tmp_path / "out"
    fd = _os.open(path, _os.O_WRONLY | _os.O_CREAT)
    try:
        assert journal_mod.write_behind(fd, parts, 0) == sum(len(p) for p in parts)
    finally:
        _os.close(fd)
    assert path.read_bytes() == b"".join(parts)


def _clip(bufs: list, limit: int) -> list:
    """The first ``limit`` bytes of ``bufs``, as a short writev would take them."""
    out = []
    for b in bufs:
        if limit <= 0:
            break
        out.append(b[:limit])
        limit -= len(out[-1])
    return out


# -- damage: kept, listed, refused when read ------------------------------------------------

def test_a_flipped_acked_record_is_damage_kept_across_reopens(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), group="g1", disks=["vda"])
    records = [w(1, b"a" * 100), w(2, b"b" * 100, offset=4096), w(3, b"c" * 100)]
    for r in records:
        j.append([r])
    j.close()
    path = seg_path(tmp_path, 1)
    buf = bytearray(path.read_bytes())
    buf[size_of(records[0]) + 60] ^= 0x10  # the last but one record's data
    path.write_bytes(bytes(buf))
    for _ in range(2):  # found again, listed once
        j = Journal(str(tmp_path), group="g1", disks=["vda"])
        assert j.dropped_tail == 0 and path.stat().st_size == len(buf)
        assert [(d.offset, d.end, d.disk, d.disk_offset, d.disk_length) for d in j.damage] \
            == [(148, 296, 0, 4096, 100)]
        with pytest.raises(JournalCorrupt) as e:
            read_all(j)
        assert str(e.value) == ("group g1, disk vda: journal segment %s: 148 damaged bytes "
                                "at byte 148" % path)
        assert e.value.damage is j.damage[0]
        assert [r for r, _ in j.read_from((1, 296))] == records[2:]
        j.close()
    j = Journal(str(tmp_path))
    j.append([w(4, b"d")])  # appends go on after the damage
    assert [r for r, _ in j.read_from((1, 296))] == [records[2], w(4, b"d")]
    j.close()


def test_verify_and_read_at_record_damage_in_a_closed_segment(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=100)
    j.append([w(1, b"a" * 60)])
    j.append([w(2, b"b" * 60)])
    j.append([w(3, b"c" * 60)])
    assert j.segments() == [1, 2, 3]
    j.close()
    for segno in (1, 2):
        path = seg_path(tmp_path, segno)
        buf = bytearray(path.read_bytes())
        buf[RECORD.size + 5] ^= 1
        path.write_bytes(bytes(buf))
    j = Journal(str(tmp_path), segment_max=100)
    assert j.damage == []  # their index files hold: found when checked
    assert [(d.segment, d.found) for d in j.verify((2, 0))] == [(2, "read")]
    with pytest.raises(JournalCorrupt, match="byte 0"):
        j.read_at(1, 0)
    assert [(d.segment, d.offset, d.end) for d in j.damage] == [(1, 0, 108), (2, 0, 108)]
    assert j.damage_from((1, 1)).segment == 2  # type: ignore[union-attr]
    j.drop_before(2)  # applied: the replicas hold segment 1, its damage is forgotten
    assert [d.segment for d in j.damage] == [2]
    j.close()
    assert [d.segment for d in Journal(str(tmp_path), segment_max=100).damage] == [2]


def test_a_closed_segment_cut_short_is_missing_acked_bytes(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=200)
    j.append([w(1, b"a" * 60), w(2, b"b" * 60)])  # segment 1: 216 bytes
    j.append([w(3, b"c")])
    j.close()
    os.truncate(seg_path(tmp_path, 1), 150)  # its index still says 216
    j = Journal(str(tmp_path), segment_max=200)
    assert [(d.segment, d.offset, d.end, d.missing) for d in j.damage] == [(1, 108, 150, 66)]
    assert "66 acknowledged bytes missing after it" in j.describe(j.damage[0])
    j.close()
