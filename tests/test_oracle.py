"""The oracle itself (lab/oracle.py): it passes a right point and fails each kind of wrong
one, on images written through real NBD (nbdkit's file plugin)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Dict, Iterator, Tuple

import pytest

from lab.oracle import (
    BLOCK_SIZE,
    OracleFailure,
    OracleLog,
    OracleWriter,
    check,
    make_block,
)

SIZE = 1024 * 1024  # 256 blocks: overwrites are common


def nbd_uri(path: Path) -> str:
    return "nbd+unix:///?socket=%s" % path


@pytest.fixture
def written(tmp_path: Path) -> Iterator[Tuple[OracleWriter, Dict[str, Path], Dict[str, Path]]]:
    """Two disks written through nbdkit, 300 writes; snapshots of both at a barrier taken
    after 150 of them."""
    import subprocess

    images: Dict[str, Path] = {}
    procs = []
    uris = {}
    for name in ("vda", "vdb"):
        img = tmp_path / ("%s.img" % name)
        with open(img, "wb") as f:
            f.truncate(SIZE)
        sock = tmp_path / ("%s.sock" % name)
        procs.append(subprocess.Popen(["nbdkit", "-f", "-U", str(sock), "file", str(img)]))
        images[name] = img
        uris[name] = nbd_uri(sock)
    import time

    deadline = time.monotonic() + 30
    while not all((tmp_path / ("%s.sock" % n)).exists() for n in images):
        assert time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    w = OracleWriter(uris, SIZE, seed=7, flush_every=10, log_path=str(tmp_path / "log"))
    snaps: Dict[str, Path] = {}
    try:
        for _ in range(150):
            w.step()
        w.barrier()
        for name, img in images.items():
            snaps[name] = tmp_path / ("%s.snap" % name)
            shutil.copyfile(img, snaps[name])
        for _ in range(150):
            w.step()
        w.finish()
        yield w, images, snaps
    finally:
        w.close()
        for p in procs:
            p.terminate()
            p.wait(10)


def test_a_right_point_passes_and_the_log_reloads(written, tmp_path: Path) -> None:
    w, images, snaps = written
    last = w.log.barriers[-1]
    v = check({n: str(p) for n, p in images.items()}, w.log, len(w.log.barriers) - 1)
    assert v.prefix == w.log.sent == last == 300 and v.blocks == 2 * SIZE // BLOCK_SIZE
    reloaded = OracleLog.load(str(tmp_path / "log"), ["vda", "vdb"])
    assert check({n: str(p) for n, p in images.items()}, reloaded).prefix == 300
    old = check({n: str(p) for n, p in snaps.items()}, w.log, at_barrier=True)
    assert old.prefix == 150 and w.log.barriers[old.barrier] == 150


def flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x01]))


def newest_block(w: OracleWriter, disk: int) -> int:
    return max(b for (d, b) in w.log.history if d == disk)


def test_a_torn_block_fails(written) -> None:
    w, images, _ = written
    d, b, _gen = w.log.writes[300]
    flip(images[w.names[d]], b * BLOCK_SIZE + 2000)
    with pytest.raises(OracleFailure, match="torn block"):
        check({n: str(p) for n, p in images.items()}, w.log)


def _block(path: Path, index: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(index * BLOCK_SIZE)
        return f.read(BLOCK_SIZE)


def _put(path: Path, index: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(index * BLOCK_SIZE)
        f.write(data)


def _overwritten_after_snapshot(w: OracleWriter) -> Tuple[str, int]:
    """A block written both before and after the snapshot (barrier at write 150)."""
    for (d, b), wids in w.log.history.items():
        if wids[0] <= 150 < wids[-1] and wids[-1] < 300:
            return w.names[d], b
    raise AssertionError("no block overwritten after the snapshot")


def test_a_lost_acked_write_fails(written) -> None:
    """One block rolled back to its state at the snapshot: an acked write is missing."""
    w, images, snaps = written
    name, b = _overwritten_after_snapshot(w)
    _put(images[name], b, _block(snaps[name], b))
    with pytest.raises(OracleFailure, match="a newer write is missing"):
        check({n: str(p) for n, p in images.items()}, w.log)


def test_a_write_from_the_future_fails(written) -> None:
    """The snapshot with one block of the end: a write past its prefix."""
    w, images, snaps = written
    name, b = _overwritten_after_snapshot(w)
    _put(snaps[name], b, _block(images[name], b))
    with pytest.raises(OracleFailure, match=r"from its future|not a prefix"):
        check({n: str(p) for n, p in snaps.items()}, w.log)


def test_disks_at_different_barriers_fail(written) -> None:
    w, images, snaps = written
    with pytest.raises(OracleFailure, match="not a prefix"):
        check({"vda": str(snaps["vda"]), "vdb": str(images["vdb"])}, w.log)
    with pytest.raises(OracleFailure, match="not a prefix"):
        check({"vda": str(images["vda"]), "vdb": str(snaps["vdb"])}, w.log)


def test_a_point_before_the_barrier_it_must_reach_fails(written) -> None:
    w, _images, snaps = written
    with pytest.raises(OracleFailure, match="acknowledged and flushed writes were lost"):
        check({n: str(p) for n, p in snaps.items()}, w.log, len(w.log.barriers) - 1)


def test_misplaced_zeroed_alien_and_unsent_blocks_fail(written) -> None:
    w, images, _ = written
    d0 = w.names.index("vda")
    b = newest_block(w, d0)
    good = _block(images["vda"], b)
    cases = [
        (b, bytes(BLOCK_SIZE), "not a prefix"),                       # zeroed
        (b, b"x" * BLOCK_SIZE, "not an oracle block"),                # alien data
        ((b + 1) % (SIZE // BLOCK_SIZE), good, "misplaced"),          # copied elsewhere
        (b, make_block(d0, b * BLOCK_SIZE, 99, 12345), "never sent"),  # a forged write
    ]
    for index, data, why in cases:
        saved = _block(images["vda"], index)
        _put(images["vda"], index, data)
        with pytest.raises(OracleFailure, match=why):
            check({n: str(p) for n, p in images.items()}, w.log)
        _put(images["vda"], index, saved)
    assert check({n: str(p) for n, p in images.items()}, w.log).prefix == 300


def test_a_point_not_at_a_barrier_fails_when_one_is_required(written) -> None:
    w, images, _ = written
    w.log.barriers.pop()  # pretend the last flush never happened
    w.log.barriers.pop()
    with pytest.raises(OracleFailure, match="not a flush barrier"):
        check({n: str(p) for n, p in images.items()}, w.log, at_barrier=True)
    with pytest.raises(OracleFailure, match="has disks"):
        check({"vda": str(images["vda"])}, w.log)
