"""Failed I/O on the protected disk (nbd_plugin/ioerrors.py through the change log): a
failed write owes its range, a failed flush owes every change since the last good one, a
failed read is only counted; the disk is consistent (and the error resolved) only once
every owed range was read back."""

from __future__ import annotations

from test_changelog import new_log, resync_all, take_all, write

from formats.localwire import KIND_CONSISTENT, KIND_WRITE
from nbd_plugin import ioerrors
from nbd_plugin.ioerrors import WrittenSinceFlush


def test_a_failed_write_owes_its_range_until_read_back() -> None:
    cl = new_log()
    disk = bytearray(8192)
    token = cl.begin(4096, 512)
    cl.failed(token, 4096, 512, "write of 512 bytes at 4096: [Errno 5] EIO")
    c = cl.counters()
    assert (c["io_errors"], c["io_error_unresolved"], c["inconsistent"]) == (1, 1, 1)
    assert "at 4096" in c["io_error"]
    assert cl.dirty.ranges() == [(4096, 512)]
    # The range lock is free again: the next write to it does not wait.
    write(cl, 4096, b"x" * 512)
    disk[4096:4608] = b"x" * 512
    resync_all(cl, disk)
    c = cl.counters()
    assert (c["io_errors"], c["io_error_unresolved"], c["inconsistent"]) == (1, 0, 0)
    assert c["io_error"], "the last error stays shown after it is resolved"
    assert take_all(cl)[-1].kind == KIND_CONSISTENT


def test_a_failed_flush_owes_every_change_since_the_last_good_flush() -> None:
    cl = new_log()
    write(cl, 0, b"a" * 100)
    cl.flush()                      # good: what came before is durable on the disk
    write(cl, 1000, b"b" * 100)
    write(cl, 3000, b"c" * 50)
    cl.flush_failed("flush: [Errno 5] EIO")
    assert cl.dirty.ranges() == [(1000, 100), (3000, 50)]
    c = cl.counters()
    assert (c["io_errors"], c["io_error_unresolved"], c["inconsistent"]) == (1, 1, 1)
    # A second failed flush with nothing written since owes nothing new.
    resync_all(cl, bytearray(4096))
    cl.flush_failed("flush: [Errno 5] EIO")
    assert cl.dirty.ranges() == []
    assert cl.counters()["io_errors"] == 2


def test_a_failed_read_is_counted_and_owes_nothing() -> None:
    cl = new_log()
    cl.read_failed("read of 512 bytes at 0: [Errno 5] EIO")
    c = cl.counters()
    assert (c["io_errors"], c["io_error_unresolved"], c["inconsistent"]) == (1, 0, 0)
    assert cl.dirty.ranges() == []


def test_a_record_queued_before_a_failed_flush_is_still_shipped() -> None:
    cl = new_log()
    write(cl, 0, b"a" * 100)
    cl.flush_failed("flush: EIO")
    out = take_all(cl)
    assert [r.kind for r in out] == [KIND_WRITE]
    assert cl.dirty.ranges() == [(0, 100)]  # and read back as well: its content is unknown


def test_written_since_flush_stays_bounded() -> None:
    w = WrittenSinceFlush()
    for i in range(ioerrors.MAX_RANGES + 10):
        w.add(i * 10_000, 100)
    w.add(5, 0)  # nothing
    ranges = w.take()
    assert len(ranges) <= ioerrors.MAX_RANGES
    start = min(o for o, _ in ranges)
    end = max(o + n for o, n in ranges)
    assert start == 0 and end == (ioerrors.MAX_RANGES + 9) * 10_000 + 100
    assert w.take() == []
