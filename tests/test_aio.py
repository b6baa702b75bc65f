"""agent/target/aio.py: both replica writers, on real files and a real loop device.

Every test runs against the twin (``python``) and the libaio writer (``libaio``; skipped
where the ``libaio`` package does not import, as on Debian's packages alone)."""

from __future__ import annotations

import os
import random
import subprocess
from pathlib import Path
from typing import Iterator, List, Optional

import pytest

from agent.target import aio

MiB = 1024 * 1024
WRITERS = [pytest.param("python"),
           pytest.param("libaio", marks=pytest.mark.skipif(
               not aio.available("libaio"), reason="the libaio package is not installed"))]


@pytest.fixture(params=WRITERS)
def kind(request: pytest.FixtureRequest) -> Iterator[str]:
    aio.prefer(request.param)
    yield request.param
    aio.prefer("libaio")


def open_file(path: Path, size: int) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    os.ftruncate(fd, size)
    return fd


def test_random_unaligned_overlapping_writes_and_punches_read_back(
        tmp_path: Path, kind: str) -> None:
    size = 4 * MiB
    path = tmp_path / "r.img"
    fd = open_file(path, size)
    w = aio.open_writer(fd, str(path))
    assert w.kind == kind  # the test would pass on the twin alone otherwise
    model = bytearray(size)
    rng = random.Random(7)
    for step in range(300):
        if step % 40 == 0:
            os.pread(fd, size, 0)  # the page cache holds the old bytes: never read stale
        offset = rng.choice([0, 4096, rng.randrange(size)])
        length = rng.choice([1, 511, 4096, 8192 + 3, 300000, MiB + 4096, 2 * MiB])
        length = min(length, size - offset)
        if rng.random() < 0.1:
            w.punch(offset, length)
            model[offset:offset + length] = bytes(length)
        else:
            data = rng.randbytes(length)
            w.pwrite(data, offset)
            model[offset:offset + length] = data
        if step % 25 == 0:
            w.drain()
            assert os.pread(fd, size, 0) == model
    w.sync()
    assert os.pread(fd, size, 0) == model
    w.close()
    os.close(fd)
    assert path.read_bytes() == model


def test_a_write_over_a_write_in_flight_lands_after_it(tmp_path: Path, kind: str) -> None:
    path = tmp_path / "r.img"
    fd = open_file(path, 8 * MiB)
    w = aio.open_writer(fd, str(path))
    for i in range(6):  # aligned: several direct writes in flight, then one over the first
        w.pwrite(bytes([i + 1]) * MiB, i * MiB)
    w.pwrite(b"\xee" * (MiB + 4096), 4096)        # direct, over writes 0 and 1
    w.pwrite(b"\xdd" * 100, MiB - 50)              # buffered, across them
    w.drain()
    got = os.pread(fd, 6 * MiB, 0)
    want = bytearray(b"".join(bytes([i + 1]) * MiB for i in range(6)))
    want[4096:4096 + MiB + 4096] = b"\xee" * (MiB + 4096)
    want[MiB - 50:MiB + 50] = b"\xdd" * 100
    assert got == want
    w.close()
    os.close(fd)


def test_a_writer_where_o_direct_is_refused_is_the_twin(tmp_path: Path) -> None:
    # A pipe takes no O_DIRECT: the twin writes, whatever is preferred.
    r, wfd = os.pipe()
    try:
        assert aio.open_writer(wfd, "pipe").kind == "python"
    finally:
        os.close(r)
        os.close(wfd)


def test_an_unknown_writer_is_refused() -> None:
    with pytest.raises(ValueError, match="no writer 'fast'"):
        aio.prefer("fast")


@pytest.fixture
def loop(tmp_path: Path) -> Iterator[str]:
    """A 1 MiB loop device."""
    backing = tmp_path / "loop.img"
    with open(backing, "wb") as f:
        f.truncate(MiB)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], check=True,
                         capture_output=True, text=True).stdout.strip()
    yield dev
    subprocess.run(["losetup", "-d", dev], check=False)


def test_a_short_write_at_a_devices_end_names_the_file_and_offset(
        loop: str, kind: str) -> None:
    fd = os.open(loop, os.O_RDWR | os.O_CLOEXEC)
    w = aio.open_writer(fd, loop)
    assert w.kind == kind
    try:
        with pytest.raises(OSError) as e:
            w.pwrite(b"x" * 8192, MiB - 4096)  # its first page fits, the second does not
            w.drain()                           # (the twin fails at once, in pwrite)
        assert e.value.filename == loop
        assert "at byte %d" % MiB in str(e.value)
        assert e.value.errno in (28, 5)     # ENOSPC (past a block device's end) or EIO
        assert os.pread(fd, 4096, MiB - 4096) == b"x" * 4096
        # The error was raised once; the writer goes on.
        w.pwrite(b"z" * 4096, 0)
        w.sync()
        assert os.pread(fd, 4096, 0) == b"z" * 4096
    finally:
        w.close()
        os.close(fd)


def test_a_write_past_a_devices_end_names_the_file_and_offset(loop: str, kind: str) -> None:
    fd = os.open(loop, os.O_RDWR | os.O_CLOEXEC)
    w = aio.open_writer(fd, loop)
    try:
        with pytest.raises(OSError) as e:
            w.pwrite(b"y" * 8192, 2 * MiB)
            w.drain()
        assert e.value.filename == loop
        assert "at byte %d" % (2 * MiB) in str(e.value)
    finally:
        w.close()
        os.close(fd)


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs."""
    where = tmp_path / "small"
    where.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(where)],
                   check=True)
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_full_file_system_names_the_file_and_offset(small_fs: Path, kind: str) -> None:
    path = small_fs / "r.img"
    fd = open_file(path, 4 * MiB)
    w = aio.open_writer(fd, str(path))
    assert w.kind == kind
    try:
        with pytest.raises(OSError) as e:
            for i in range(4):
                w.pwrite(b"q" * MiB, i * MiB)
            w.sync()
        assert e.value.errno == 28
        assert e.value.filename == str(path)
        assert "No space left on device at byte" in str(e.value)
        w.punch(0, 4 * MiB)  # room again: the writer still works
        w.pwrite(b"ok", 10)
        w.sync()
        assert os.pread(fd, 2, 10) == b"ok"
    finally:
        w.close()
        os.close(fd)


@pytest.mark.parametrize("limit", [None, 3 * MiB // 2 + 5])
def test_write_behind_writes_every_part_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 limit: Optional[int]) -> None:
    """Parts past BEHIND (writeback started as it goes), after a start that is not a page's,
    and writev calls that write only part of what they were given."""
    real = os.writev
    if limit is not None:
        def short(fd: int, bufs: List[memoryview]) -> int:
            out, left = [], limit
            for b in bufs:
                if left <= 0:
                    break
                out.append(b[:left])
                left -= len(out[-1])
            return real(fd, out)
        monkeypatch.setattr(os, "writev", short)
    rng = random.Random(3)
    parts = [rng.randbytes(rng.choice([48, 100, MiB, 3 * MiB + 1])) for _ in range(12)]
    path = tmp_path / "seg"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        os.write(fd, b"h" * 1000)
        assert aio.write_behind(fd, parts, 1000) == sum(len(p) for p in parts)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    assert path.read_bytes() == b"h" * 1000 + b"".join(parts)


def test_an_initial_sync_through_either_writer_leaves_true_digests(tmp_path: Path,
                                                                  kind: str) -> None:
    """Chunks written whole take their digest from the data, the others are read back: either
    way each digest is the replica's own bytes' (what a scrub or a restore checks)."""
    from agent.target.digests import digest
    from agent.target.group import TargetGroup
    from formats.records import KIND_WRITE, JRecord

    size = 3 * MiB + 4096 * 3 + 100  # a short last chunk
    g = TargetGroup(str(tmp_path / "g"), "g", [("a", size)], protection="p")
    assert g.writers[0].kind == kind
    rng = random.Random(5)
    batch = []
    for seq, (offset, length) in enumerate([(0, MiB), (MiB, 2 * MiB), (100, 5000),
                                            (MiB - 7, 9), (3 * MiB, size - 3 * MiB)], 1):
        batch.append(JRecord(0, 1, seq, KIND_WRITE, 0, offset, length, seq,
                             rng.randbytes(length)))
    g.accept(batch)
    d = g.digests[0]
    for c in range(d.chunks):
        start, n = d.chunk_range(c)
        assert d.entries[c] == digest(os.pread(g.fds[0], n, start)), c
    g.close()
