"""ChangeLog: sequence numbers, the bounded queue, overflow to the dirty map, resync, acks,
rewinds, sync requests and the range lock; then a model of a whole disk, a lossy link and a
target that must end up with the same bytes as the source."""

from __future__ import annotations

import functools
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Set

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from formats import localwire as lw
from formats.localwire import (
    FLAG_FUA,
    FLAG_INCONSISTENT,
    FLAG_RESYNC,
    KIND_CONSISTENT,
    KIND_FLUSH,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
    RECORD,
    Record,
)
from nbd_plugin.changelog import RECORD_DATA_MAX, ChangeLog
from nbd_plugin.dirtymap import DirtyMap

HDR = RECORD.size  # 40: what a record costs in the queue besides its data


class FakeClock:
    def __init__(self, now: int = 1_000) -> None:
        self.now = now

    def __call__(self) -> int:
        return self.now

    def advance(self, ns: int) -> None:
        self.now += ns


def new_log(queue_limit: int = 1 << 20, gen: int = 1, clock: Optional[FakeClock] = None,
            dirty: Optional[DirtyMap] = None) -> ChangeLog:
    return ChangeLog(gen, queue_limit, dirty=dirty, clock=clock or FakeClock())


def write(cl: ChangeLog, offset: int, data: bytes, flags: int = 0) -> None:
    token = cl.begin(offset, len(data))
    cl.commit(token, KIND_WRITE, offset, len(data), data, flags)


def change(cl: ChangeLog, kind: int, offset: int, length: int) -> None:
    token = cl.begin(offset, length)
    cl.commit(token, kind, offset, length)


def take(cl: ChangeLog, max_bytes: int, timeout: float = 0) -> List[Record]:
    """The records of a take, without its watermark."""
    records, _watermark = cl.take(max_bytes, timeout)
    return records


def take_all(cl: ChangeLog) -> List[Record]:
    return take(cl, 1 << 30)


def resync_all(cl: ChangeLog, disk: bytearray, max_length: int = 64) -> None:
    """Read every dirty range back from ``disk`` (the queue must have room)."""
    while True:
        taken = cl.resync_take(max_length)
        if taken is None:
            return
        offset, length, token = taken
        cl.commit(token, KIND_WRITE, offset, length, bytes(disk[offset:offset + length]),
                  FLAG_RESYNC)


def seqs(records: List[Record]) -> List[int]:
    return [r.seq for r in records]


def overflowed_log(queue_limit: int = HDR + 100) -> ChangeLog:
    """A log whose queue holds one 100-byte write, and a second write that went dirty."""
    cl = new_log(queue_limit=queue_limit)
    write(cl, 0, b"a" * 100)
    write(cl, 1000, b"b" * 100)  # does not fit
    return cl


def wait_until(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in %s s" % timeout
        time.sleep(0.001)


class Blocker(threading.Thread):
    """Runs ``fn`` in a thread; ``done`` is set when it returned."""

    def __init__(self, fn: Callable[[], object]) -> None:
        super().__init__(daemon=True)
        self.fn = fn
        self.result: Any = None
        self.done = threading.Event()
        self.start()

    def run(self) -> None:
        self.result = self.fn()
        self.done.set()


# -- sequence numbers and records ------------------------------------------------------------

def test_records_get_contiguous_sequence_numbers_and_their_fields() -> None:
    clock = FakeClock(500)
    cl = new_log(gen=7, clock=clock)
    write(cl, 4096, b"hello", FLAG_FUA)
    clock.advance(10)
    change(cl, KIND_ZERO, 0, 8192)
    clock.advance(10)
    change(cl, KIND_TRIM, 65536, 512)
    cl.flush()
    out = take_all(cl)
    assert out == [
        Record(1, 500, 4096, 5, 7, KIND_WRITE, FLAG_FUA, b"hello"),
        Record(2, 510, 0, 8192, 7, KIND_ZERO, 0, None),
        Record(3, 520, 65536, 512, 7, KIND_TRIM, 0, None),
        Record(4, 520, 0, 0, 7, KIND_FLUSH, 0, None),
    ]
    assert cl.counters()["next_seq"] == 5


def test_flush_records_only_after_a_change() -> None:
    cl = new_log()
    cl.flush()
    assert take_all(cl) == []
    write(cl, 0, b"x")
    cl.flush()
    cl.flush()
    assert [r.kind for r in take_all(cl)] == [KIND_WRITE, KIND_FLUSH]
    cl.flush()
    assert take_all(cl) == []
    change(cl, KIND_TRIM, 0, 10)
    cl.flush()
    assert [r.kind for r in take_all(cl)] == [KIND_TRIM, KIND_FLUSH]


def test_release_drops_the_lock_without_a_record() -> None:
    cl = new_log()
    token = cl.begin(0, 10)
    cl.release(token)
    assert take_all(cl) == []
    write(cl, 0, b"z" * 10)  # the range is free again
    assert seqs(take_all(cl)) == [1]


# -- the queue bound and the dirty map -------------------------------------------------------

def test_queue_bound_sends_the_change_to_the_dirty_map() -> None:
    cl = new_log(queue_limit=2 * (HDR + 100))
    write(cl, 0, b"a" * 100)
    write(cl, 200, b"b" * 100)
    assert cl.counters()["queued_bytes"] == 2 * (HDR + 100)
    write(cl, 1000, b"c" * 100)
    c = cl.counters()
    assert c["queued_bytes"] == 2 * (HDR + 100)
    assert c["queued_records"] == 2
    assert c["next_seq"] == 3  # the dirty change took no sequence number
    assert cl.dirty.ranges() == [(1000, 100)]
    assert c["dirty_bytes"] == 100 and c["dirtied_bytes"] == 100
    assert c["inconsistent"] == 1
    assert [r.flags for r in take_all(cl)] == [0, 0]


def test_zero_and_trim_cost_only_their_header_in_the_queue() -> None:
    cl = new_log(queue_limit=3 * HDR)
    change(cl, KIND_ZERO, 0, 1 << 30)
    change(cl, KIND_TRIM, 1 << 30, 1 << 30)
    change(cl, KIND_ZERO, 0, 512)
    assert cl.counters()["queued_bytes"] == 3 * HDR
    change(cl, KIND_ZERO, 4096, 512)
    assert cl.dirty.ranges() == [(4096, 512)]


def test_after_an_overflow_later_records_are_flagged_inconsistent() -> None:
    cl = overflowed_log()
    first = take_all(cl)
    assert first[0].flags & FLAG_INCONSISTENT == 0
    cl.ack(1, 1)
    write(cl, 0, b"c" * 10, FLAG_FUA)
    cl.flush()
    later = take_all(cl)
    assert [r.kind for r in later] == [KIND_WRITE, KIND_FLUSH]
    assert all(r.flags & FLAG_INCONSISTENT for r in later)
    assert later[0].flags == FLAG_FUA | FLAG_INCONSISTENT


def test_a_large_write_becomes_consecutive_records() -> None:
    cl = new_log(queue_limit=1 << 30)
    data = bytes(range(256)) * ((2 * RECORD_DATA_MAX + 100) // 256 + 1)
    data = data[:2 * RECORD_DATA_MAX + 100]
    write(cl, 512, data, FLAG_FUA)
    out = take_all(cl)
    assert [(r.seq, r.offset, r.length, r.flags) for r in out] == [
        (1, 512, RECORD_DATA_MAX, FLAG_FUA),
        (2, 512 + RECORD_DATA_MAX, RECORD_DATA_MAX, FLAG_FUA),
        (3, 512 + 2 * RECORD_DATA_MAX, 100, FLAG_FUA),
    ]
    assert b"".join(r.data or b"" for r in out) == data


def test_a_reused_buffer_is_copied_when_queued() -> None:
    """nbdkit reuses its buffer once pwrite returns: what is queued must be a copy, also
    when the copy is made under the lock (the queue gained room after the guess)."""
    cl = new_log(queue_limit=1 << 30)
    for size in (4096, RECORD_DATA_MAX + 10):
        buf = bytearray(b"a" * size)
        cl.commit(cl.begin(0, size), KIND_WRITE, 0, size, memoryview(buf))
        buf[:] = b"b" * size
    cl._queued_bytes = 1 << 40  # the guess before the lock sees a full queue...
    buf = bytearray(b"c" * 100)
    token = cl.begin(0, 100)
    real_lock = cl._lock

    class Freeing:
        def __enter__(self) -> None:
            real_lock.acquire()
            cl._queued_bytes = 0  # ...and an ack frees it before the lock is taken

        def __exit__(self, *exc: object) -> None:
            real_lock.release()

    cl._lock = Freeing()  # type: ignore[assignment]
    cl.commit(token, KIND_WRITE, 0, 100, memoryview(buf))
    cl._lock = real_lock
    buf[:] = b"d" * 100
    out = take_all(cl)
    assert [r.data for r in out] == [b"a" * 4096, b"a" * RECORD_DATA_MAX, b"a" * 10, b"c" * 100]


def test_a_large_write_that_fits_keeps_the_queue_within_its_bound() -> None:
    length = 2 * RECORD_DATA_MAX + 100
    cl = new_log(queue_limit=HDR + length)
    write(cl, 0, bytes(length))
    assert cl.counters()["queued_bytes"] <= cl.queue_limit


def test_flush_is_dropped_when_the_queue_is_full() -> None:
    cl = new_log(queue_limit=HDR + 10)
    write(cl, 0, b"x" * 10)
    cl.flush()
    assert [r.kind for r in take_all(cl)] == [KIND_WRITE]


# -- resync ----------------------------------------------------------------------------------

def test_resync_reads_dirty_ranges_then_marks_the_stream_consistent_once() -> None:
    disk = bytearray(4096)
    cl = new_log(queue_limit=HDR + 900)
    disk[0:900] = b"a" * 900
    write(cl, 0, b"a" * 900)
    disk[1000:1100] = b"b" * 100
    write(cl, 1000, b"b" * 100)  # does not fit
    assert cl.dirty.ranges() == [(1000, 100)]
    assert seqs(take_all(cl)) == [1]
    cl.ack(1, 1)
    taken = cl.resync_take(30)
    assert taken is not None and taken[:2] == (1000, 30)
    cl.commit(taken[2], KIND_WRITE, 1000, 30, bytes(disk[1000:1030]), FLAG_RESYNC)
    resync_all(cl, disk, max_length=30)
    out = take_all(cl)
    assert [(r.offset, r.length) for r in out[:-1]] == [(1000, 30), (1030, 30), (1060, 30),
                                                        (1090, 10)]
    assert all(r.flags == FLAG_RESYNC | FLAG_INCONSISTENT for r in out[:-1])
    assert b"".join(r.data or b"" for r in out[:-1]) == b"b" * 100
    assert [r.kind for r in out] == [KIND_WRITE] * 4 + [KIND_CONSISTENT]
    assert out[-1].flags == 0
    assert seqs(out) == [2, 3, 4, 5, 6]
    c = cl.counters()
    assert c["inconsistent"] == 0 and c["dirty_bytes"] == 0 and c["resync_bytes"] == 100
    # Consistent again: no more markers, no more flags.
    write(cl, 0, b"d")
    resync_all(cl, disk)
    assert [(r.kind, r.flags) for r in take_all(cl)] == [(KIND_WRITE, 0)]


def test_resync_take_waits_for_room_in_the_queue() -> None:
    cl = overflowed_log()
    assert cl.resync_take(100) is None  # the first write still fills the queue
    cl.ack(1, 1)
    assert cl.resync_take(HDR + 100 + 1 - HDR) is None  # one byte short
    taken = cl.resync_take(100)
    assert taken is not None and taken[:2] == (1000, 100)


def test_resync_take_on_a_clean_map_is_none() -> None:
    assert new_log().resync_take(4096) is None


def test_resync_records_may_pass_the_queue_bound_once_admitted() -> None:
    limit = 2 * (HDR + 100)
    cl = new_log(queue_limit=limit)
    cl.mark_dirty([(0, 100)])
    taken = cl.resync_take(100)
    assert taken is not None
    write(cl, 1000, b"g" * 100)
    write(cl, 2000, b"h" * 100)  # fills the queue while the resync reads
    assert cl.counters()["queued_bytes"] == limit
    cl.commit(taken[2], KIND_WRITE, 0, 100, b"r" * 100, FLAG_RESYNC)
    out = take_all(cl)
    assert [r.kind for r in out] == [KIND_WRITE, KIND_WRITE, KIND_WRITE, KIND_CONSISTENT]
    assert out[2].flags & FLAG_RESYNC
    assert cl.counters()["queued_bytes"] == limit + HDR + 100 + HDR


def test_resync_abort_puts_the_range_back() -> None:
    cl = new_log()
    cl.mark_dirty([(0, 100)])
    taken = cl.resync_take(40)
    assert taken is not None
    assert cl.dirty.ranges() == [(40, 60)]
    cl.resync_abort(taken[2], 0, 40)
    assert cl.dirty.ranges() == [(0, 100)]
    assert take_all(cl) == []
    assert cl.counters()["inconsistent"] == 1
    write(cl, 0, b"x" * 100)  # the range lock was released
    resync_all(cl, bytearray(100))
    assert [r.kind for r in take_all(cl)][-1] == KIND_CONSISTENT


def test_no_marker_while_another_resync_read_is_out() -> None:
    cl = new_log()
    cl.mark_dirty([(0, 10), (100, 10)])
    a = cl.resync_take(10)
    b = cl.resync_take(10)
    assert a is not None and b is not None
    assert not cl.dirty
    cl.commit(a[2], KIND_WRITE, 0, 10, b"a" * 10, FLAG_RESYNC)
    assert [r.kind for r in take_all(cl)] == [KIND_WRITE]
    cl.commit(b[2], KIND_ZERO, 100, 10, None, FLAG_RESYNC)
    assert [r.kind for r in take_all(cl)] == [KIND_ZERO, KIND_CONSISTENT]


def test_overflow_during_resync_delays_the_marker() -> None:
    cl = new_log(queue_limit=HDR + 10 + 5)
    cl.mark_dirty([(0, 10)])
    taken = cl.resync_take(10)
    assert taken is not None
    write(cl, 50, b"w" * 10)
    write(cl, 60, b"v" * 10)  # does not fit: dirty again
    cl.commit(taken[2], KIND_WRITE, 0, 10, b"r" * 10, FLAG_RESYNC)
    assert KIND_CONSISTENT not in [r.kind for r in take_all(cl)]
    assert cl.dirty.ranges() == [(60, 10)]
    cl.ack(1, 2)
    resync_all(cl, bytearray(100), max_length=10)
    assert [r.kind for r in take_all(cl)] == [KIND_WRITE, KIND_CONSISTENT]


def test_a_log_built_on_a_dirty_map_starts_inconsistent() -> None:
    dirty = DirtyMap()
    dirty.add(0, 10)
    clock = FakeClock(100)
    cl = new_log(dirty=dirty, clock=clock)
    clock.advance(50)
    c = cl.counters()
    assert c["inconsistent"] == 1 and c["lag_ns"] == 50
    write(cl, 20, b"x")
    assert take_all(cl)[0].flags == FLAG_INCONSISTENT


def test_mark_dirty_of_nothing_keeps_the_stream_consistent() -> None:
    cl = new_log()
    cl.mark_dirty([])
    write(cl, 0, b"x")
    assert take_all(cl)[0].flags == 0


# -- the link side ---------------------------------------------------------------------------

def test_ack_frees_the_queue_up_to_its_sequence_number() -> None:
    cl = new_log()
    for i in range(5):
        write(cl, i * 100, b"x" * 10)
    take(cl, 2 * (HDR + 10))
    assert cl.counters()["queued_bytes"] == 5 * (HDR + 10)
    cl.ack(1, 3)  # frees two sent and one unsent record
    c = cl.counters()
    assert c["acked_seq"] == 3 and c["queued_records"] == 2
    assert c["queued_bytes"] == 2 * (HDR + 10)
    assert seqs(take_all(cl)) == [4, 5]


def test_ack_of_another_generation_or_an_old_seq_is_ignored() -> None:
    cl = new_log(gen=2)
    for i in range(3):
        write(cl, i, b"x")
    cl.ack(1, 3)
    assert cl.counters()["queued_records"] == 3
    cl.ack(2, 2)
    cl.ack(2, 1)
    c = cl.counters()
    assert c["acked_seq"] == 2 and c["queued_records"] == 1


def test_take_respects_max_bytes_but_returns_at_least_one_record() -> None:
    cl = new_log()
    write(cl, 0, b"x" * 1000)
    write(cl, 0, b"y" * 10)
    write(cl, 0, b"z" * 10)
    assert seqs(take(cl, 1)) == [1]
    assert seqs(take(cl, 2 * (HDR + 10))) == [2, 3]
    assert cl.counters()["sent_bytes"] == 3 * HDR + 1020


def test_take_returns_a_watermark() -> None:
    clock = FakeClock(100)
    cl = new_log(clock=clock)
    assert cl.take(1000, 0) == ([], 100)  # nothing queued: everything up to now is out
    write(cl, 0, b"x")
    clock.advance(50)
    write(cl, 1, b"y")
    clock.advance(50)
    records, watermark = cl.take(1, 0)
    assert seqs(records) == [1]
    assert watermark == 150  # record 2 completed at 150 and is not in this take
    records, watermark = cl.take(1000, 0)
    assert seqs(records) == [2]
    assert watermark == 200


def test_take_on_an_empty_queue_waits_for_the_timeout() -> None:
    cl = new_log()
    t0 = time.monotonic()
    assert take(cl, 1000, 0.05) == []
    assert time.monotonic() - t0 >= 0.04


def test_take_wakes_up_on_a_commit() -> None:
    cl = new_log()
    taker = Blocker(lambda: take(cl, 1000, 30))
    time.sleep(0.05)
    write(cl, 0, b"x")
    assert taker.done.wait(10)
    assert seqs(taker.result) == [1]


def test_writes_into_the_dirty_map_wake_the_link_once_then_an_ack_does() -> None:
    """The first write that goes dirty wakes a waiting taker (there is a map to resync);
    later ones do not (the full queue lets it resync nothing), until an ack frees room."""
    cl = new_log(queue_limit=HDR + 100)
    write(cl, 0, b"a" * 100)
    assert seqs(take(cl, 1000)) == [1]  # sent, not acked: the queue stays full
    taker = Blocker(lambda: take(cl, 1000, 30))
    time.sleep(0.05)
    write(cl, 1000, b"b" * 100)  # dirty: the map was empty
    assert taker.done.wait(10) and taker.result == []
    taker = Blocker(lambda: take(cl, 1000, 30))
    time.sleep(0.05)
    for i in range(5):
        write(cl, 2000 + 200 * i, b"c" * 100)  # dirty again: no wake
    assert not taker.done.wait(0.3)
    cl.ack(1, 1)
    assert taker.done.wait(10) and taker.result == []
    assert cl.resync_take(64) is not None  # now there is room to resync


def test_close_wakes_up_take() -> None:
    cl = new_log()
    taker = Blocker(lambda: take(cl, 1000, 30))
    time.sleep(0.05)
    cl.close()
    assert taker.done.wait(10)
    assert taker.result == []
    t0 = time.monotonic()
    assert take(cl, 1000, 30) == []
    assert time.monotonic() - t0 < 5


def test_rewind_resends_every_unacked_record_in_order() -> None:
    cl = new_log()
    for i in range(6):
        write(cl, i, b"x")
    assert seqs(take(cl, 2 * (HDR + 1))) == [1, 2]
    assert seqs(take(cl, 2 * (HDR + 1))) == [3, 4]
    cl.ack(1, 1)
    cl.rewind()
    assert seqs(take_all(cl)) == [2, 3, 4, 5, 6]
    cl.rewind()
    cl.rewind()
    assert seqs(take_all(cl)) == [2, 3, 4, 5, 6]
    cl.ack(1, 6)
    cl.rewind()
    assert take_all(cl) == []
    assert cl.counters()["queued_bytes"] == 0


def test_has_work_sees_unsent_records_and_sync_replies() -> None:
    cl = new_log()
    assert not cl.has_work()
    write(cl, 0, b"x")
    assert cl.has_work()
    take_all(cl)
    assert not cl.has_work()
    cl.request_sync("t")
    assert cl.has_work()
    cl.sync_replies()
    assert not cl.has_work()


def test_request_sync_replies_at_once_when_consistent() -> None:
    cl = new_log()
    cl.request_sync("t0")
    assert cl.sync_replies() == [("t0", 0)]
    write(cl, 0, b"x")
    write(cl, 1, b"y")
    cl.request_sync("t1")
    assert cl.sync_replies() == [("t1", 2)]
    assert cl.sync_replies() == []


def test_request_sync_waits_for_the_consistent_marker() -> None:
    disk = bytearray(2000)
    cl = overflowed_log(queue_limit=HDR + 100)
    cl.request_sync("a")
    cl.request_sync("b")
    assert cl.sync_replies() == []
    cl.ack(1, 1)
    write(cl, 0, b"later")
    assert cl.sync_replies() == []
    cl.ack(1, 2)
    resync_all(cl, disk, max_length=100)
    out = take_all(cl)
    assert out[-1].kind == KIND_CONSISTENT
    assert cl.sync_replies() == [("a", out[-1].seq), ("b", out[-1].seq)]


def test_counters_report_lag_from_the_oldest_unacked_record() -> None:
    clock = FakeClock(1000)
    cl = new_log(clock=clock)
    assert cl.counters()["lag_ns"] == 0
    write(cl, 0, b"x")
    clock.advance(300)
    write(cl, 0, b"y")
    clock.advance(200)
    assert cl.counters()["lag_ns"] == 500
    cl.ack(1, 1)
    assert cl.counters()["lag_ns"] == 200
    cl.ack(1, 2)
    assert cl.counters()["lag_ns"] == 0


# -- the range lock, with real threads -------------------------------------------------------

def test_overlapping_begin_blocks_until_release() -> None:
    cl = new_log()
    token = cl.begin(0, 100)
    other = Blocker(lambda: cl.begin(50, 100))
    assert not other.done.wait(0.1)
    cl.release(token)
    assert other.done.wait(10)
    assert other.result != token


def test_overlapping_begin_blocks_until_commit_and_sequences_in_disk_order() -> None:
    cl = new_log()
    token = cl.begin(0, 100)

    def second() -> None:
        write(cl, 99, b"2")

    other = Blocker(second)
    assert not other.done.wait(0.1)
    assert take_all(cl) == []
    cl.commit(token, KIND_WRITE, 0, 100, b"1" * 100)
    assert other.done.wait(10)
    out = take_all(cl)
    assert [(r.seq, r.offset) for r in out] == [(1, 0), (2, 99)]


def test_non_overlapping_and_adjacent_ranges_do_not_block() -> None:
    cl = new_log()
    token = cl.begin(100, 100)
    left = Blocker(lambda: cl.begin(0, 100))
    right = Blocker(lambda: cl.begin(200, 1))
    assert left.done.wait(10) and right.done.wait(10)
    cl.release(token)


def test_many_waiters_all_get_the_range_in_turn() -> None:
    cl = new_log()
    token = cl.begin(0, 10)
    writers = [Blocker(functools.partial(write, cl, 5, bytes([i]))) for i in range(8)]
    time.sleep(0.05)
    assert not any(w.done.is_set() for w in writers)
    cl.release(token)
    for w in writers:
        assert w.done.wait(10)
    assert seqs(take_all(cl)) == list(range(1, 9))


def test_resync_take_waits_for_an_overlapping_guest_write() -> None:
    cl = new_log()
    cl.mark_dirty([(0, 100)])
    guest = cl.begin(50, 10)
    resync = Blocker(lambda: cl.resync_take(1000))
    assert not resync.done.wait(0.1)
    cl.commit(guest, KIND_WRITE, 50, 10, b"g" * 10)
    assert resync.done.wait(10)
    offset, length, token = resync.result
    assert (offset, length) == (0, 100)
    # The guest write is before the resync read in the stream.
    cl.commit(token, KIND_WRITE, 0, 100, b"r" * 100, FLAG_RESYNC)
    assert [(r.seq, r.length) for r in take_all(cl)] == [(1, 10), (2, 100), (3, 0)]


def test_guest_write_waits_for_a_resync_read_of_its_range() -> None:
    cl = new_log()
    cl.mark_dirty([(0, 100)])
    taken = cl.resync_take(1000)
    assert taken is not None
    guest = Blocker(lambda: write(cl, 10, b"g"))
    assert not guest.done.wait(0.1)
    cl.commit(taken[2], KIND_WRITE, 0, 100, b"r" * 100, FLAG_RESYNC)
    assert guest.done.wait(10)
    out = take_all(cl)
    assert [(r.kind, r.offset) for r in out] == [(KIND_WRITE, 0), (KIND_CONSISTENT, 0),
                                                 (KIND_WRITE, 10)]
    assert out[2].flags == 0


# -- owed ranges -----------------------------------------------------------------------------

def test_owed_ranges_cover_dirty_unacked_and_in_flight_changes() -> None:
    cl = new_log(queue_limit=HDR + 10 + HDR)
    write(cl, 0, b"x" * 10)               # queued, will be sent
    change(cl, KIND_ZERO, 20, 5)          # queued, unsent
    write(cl, 100, b"y" * 10)             # does not fit: dirty
    cl.flush()                            # no length: nothing owed
    assert seqs(take(cl, 1)) == [1]
    token = cl.begin(200, 50)             # a write in progress
    assert cl.owed_ranges() == [(0, 10), (20, 5), (100, 10), (200, 50)]
    cl.ack(1, 1)
    cl.release(token)
    assert cl.owed_ranges() == [(20, 5), (100, 10)]
    cl.ack(1, 2)
    assert cl.owed_ranges() == [(100, 10)]


def test_owed_ranges_cover_a_resync_read_in_progress() -> None:
    cl = new_log()
    cl.mark_dirty([(0, 100)])
    taken = cl.resync_take(1000)
    assert taken is not None
    assert cl.owed_ranges() == [(0, 100)]


def test_owed_ranges_cover_a_resync_read_waiting_for_its_range_lock() -> None:
    cl = new_log()
    cl.mark_dirty([(0, 100)])
    guest = cl.begin(0, 10)
    resync = Blocker(lambda: cl.resync_take(1000))
    wait_until(lambda: not cl.dirty)  # popped; now waiting in begin()
    try:
        assert not resync.done.is_set()
        assert cl.owed_ranges() == [(0, 100)]
    finally:
        cl.release(guest)
        assert resync.done.wait(10)


# -- a whole disk, a lossy link and a target -------------------------------------------------

DISK = 256


class ReplicationMachine(RuleBasedStateMachine):
    """A source disk behind a ChangeLog, a link that may lose what it carries, and a target
    that applies records in order and drops duplicates by sequence number.

    Invariants: sequence numbers reach the target without gaps; every byte on which target
    and source differ is owed; a record without FLAG_INCONSISTENT leaves the target exactly
    as the source was when that record was made; at the end, after draining, they match."""

    @initialize(queue_limit=st.integers(HDR + 64, 6 * (HDR + 32)),
                max_ranges=st.integers(2, 5), block=st.sampled_from([0, 1, 8, 32]))
    def setup(self, queue_limit: int, max_ranges: int, block: int) -> None:
        self.clock = FakeClock()
        # block 0: a list of ranges that merges its closest ones; else a map that turns
        # into a bitmap of that block size past max_ranges.
        dirty = DirtyMap(max_ranges=max_ranges, disk_size=DISK if block else None,
                         block=block)
        self.cl = ChangeLog(1, queue_limit, dirty=dirty, clock=self.clock)
        self.source = bytearray(DISK)
        self.target = bytearray(DISK)
        self.target_seq = 0
        self.in_transit: List[Record] = []
        self.snapshots: Dict[int, bytes] = {0: bytes(DISK)}
        self.sync_wanted: Dict[str, int] = {}
        self.next_token = 0
        self.watermark = 0

    def after(self, before_next_seq: int) -> None:
        """Remember the source as each new record left it."""
        self.clock.advance(1)
        for seq in range(before_next_seq, self.cl.counters()["next_seq"]):
            self.snapshots[seq] = bytes(self.source)

    def next_seq(self) -> int:
        return self.cl.counters()["next_seq"]

    @rule(offset=st.integers(0, DISK - 1), length=st.integers(1, 32), value=st.integers(1, 255))
    def guest_write(self, offset: int, length: int, value: int) -> None:
        length = min(length, DISK - offset)
        before = self.next_seq()
        token = self.cl.begin(offset, length)
        self.source[offset:offset + length] = bytes([value]) * length
        self.cl.commit(token, KIND_WRITE, offset, length, bytes([value]) * length)
        self.after(before)
        if self.next_seq() > before:
            assert self.cl.counters()["queued_bytes"] <= self.cl.queue_limit

    @rule(offset=st.integers(0, DISK - 1), length=st.integers(1, 64),
          kind=st.sampled_from([KIND_ZERO, KIND_TRIM]))
    def guest_zero(self, offset: int, length: int, kind: int) -> None:
        length = min(length, DISK - offset)
        before = self.next_seq()
        token = self.cl.begin(offset, length)
        self.source[offset:offset + length] = bytes(length)
        self.cl.commit(token, kind, offset, length)
        self.after(before)

    @rule()
    def guest_flush(self) -> None:
        before = self.next_seq()
        self.cl.flush()
        self.after(before)

    @rule(max_length=st.integers(1, 64))
    def resync(self, max_length: int) -> None:
        before = self.next_seq()
        taken = self.cl.resync_take(max_length)
        if taken is None:
            return
        offset, length, token = taken
        assert 0 < length <= max_length
        data = bytes(self.source[offset:offset + length])
        if data.count(0) == length:
            self.cl.commit(token, KIND_ZERO, offset, length, None, FLAG_RESYNC)
        else:
            self.cl.commit(token, KIND_WRITE, offset, length, data, FLAG_RESYNC)
        self.after(before)

    @rule(max_length=st.integers(1, 64))
    def resync_read_fails(self, max_length: int) -> None:
        taken = self.cl.resync_take(max_length)
        if taken is not None:
            offset, length, token = taken
            self.cl.resync_abort(token, offset, length)

    @rule(max_bytes=st.integers(1, 300))
    def send(self, max_bytes: int) -> None:
        records, watermark = self.cl.take(max_bytes, 0)
        # Every change that completed before the previous watermark was in that take
        # or an earlier one (a rewind sends the old ones again).
        assert all(r.time_ns >= self.watermark for r in records)
        self.watermark = watermark
        self.in_transit.extend(records)

    @rule(n=st.integers(1, 10))
    def deliver(self, n: int) -> None:
        batch, self.in_transit = self.in_transit[:n], self.in_transit[n:]
        for r in batch:
            self.apply(r)

    def apply(self, r: Record) -> None:
        assert r.gen == 1
        if r.seq <= self.target_seq:
            return  # a duplicate after a rewind
        assert r.seq == self.target_seq + 1, "gap: %d after %d" % (r.seq, self.target_seq)
        self.target_seq = r.seq
        if r.kind == KIND_WRITE:
            assert r.data is not None and len(r.data) == r.length
            self.target[r.offset:r.offset + r.length] = r.data
        elif r.kind in (KIND_ZERO, KIND_TRIM):
            self.target[r.offset:r.offset + r.length] = bytes(r.length)
        if not r.flags & FLAG_INCONSISTENT:
            assert bytes(self.target) == self.snapshots[r.seq], (
                "record %d is not flagged inconsistent but the target differs from the "
                "source as it was then" % r.seq)

    @rule()
    def ack(self) -> None:
        self.cl.ack(1, self.target_seq)

    @rule()
    def stale_ack(self) -> None:
        self.cl.ack(1, max(0, self.target_seq - 3))
        self.cl.ack(2, self.target_seq + 100)  # another generation: ignored

    @rule()
    def link_cut(self) -> None:
        self.in_transit.clear()
        self.cl.rewind()
        self.watermark = 0

    @rule()
    def request_sync(self) -> None:
        self.next_token += 1
        token = "t%d" % self.next_token
        self.sync_wanted[token] = self.next_seq() - 1
        self.cl.request_sync(token)
        self.check_sync_replies()

    @invariant()
    def check_sync_replies(self) -> None:
        """Replies are collected after every step: a late one names the consistent marker
        the step just made, and covers every change made before the request."""
        for token, seq in self.cl.sync_replies():
            wanted = self.sync_wanted.pop(token)
            assert seq >= wanted
            if seq > wanted:
                assert seq == self.next_seq() - 1
            assert self.snapshots[seq] == bytes(self.source)

    @invariant()
    def differing_bytes_are_owed(self) -> None:
        owed: Set[int] = set()
        for offset, length in self.cl.owed_ranges():
            owed.update(range(offset, offset + length))
        differ = [i for i in range(DISK) if self.source[i] != self.target[i]]
        assert set(differ) <= owed, "bytes %r differ and are not owed" % (
            sorted(set(differ) - owed)[:10],)

    @invariant()
    def queue_is_bounded(self) -> None:
        # Past the bound only by the consistent marker after a resync record.
        assert self.cl.counters()["queued_bytes"] <= self.cl.queue_limit + HDR
        if not self.cl.dirty.granularity:  # a bitmap's memory is fixed
            assert len(self.cl.dirty) <= self.cl.dirty.max_ranges

    def teardown(self) -> None:
        if not hasattr(self, "cl"):
            return
        self.drain()
        assert self.target == self.source
        c = self.cl.counters()
        assert c["inconsistent"] == 0 and c["dirty_bytes"] == 0 and c["queued_bytes"] == 0
        self.check_sync_replies()
        assert not self.sync_wanted, "sync requests never answered: %r" % self.sync_wanted

    def drain(self) -> None:
        for _ in range(10_000):
            for r in self.in_transit:
                self.apply(r)
            self.in_transit.clear()
            self.cl.ack(1, self.target_seq)
            self.resync(64)
            self.in_transit.extend(take(self.cl, 1 << 20))
            if not self.in_transit and not self.cl.dirty and \
                    self.cl.counters()["queued_records"] == 0:
                return
        raise AssertionError("the log never drained")


ReplicationMachine.TestCase.settings = settings(
    deadline=None, max_examples=120, stateful_step_count=50)
test_replication_machine = ReplicationMachine.TestCase


def test_unsent_bytes_follows_take_ack_and_rewind() -> None:
    cl = ChangeLog(1, 1 << 20)
    for i in range(4):
        cl.commit(cl.begin(i * 100, 10), lw.KIND_WRITE, i * 100, 10, b"x" * 10)
    per = lw.RECORD.size + 10
    assert cl.unsent_bytes() == 4 * per
    cl.take(2 * per, 0)
    assert cl.unsent_bytes() == 2 * per
    cl.ack(1, 1)
    assert cl.unsent_bytes() == 2 * per
    cl.rewind()
    assert cl.unsent_bytes() == 3 * per
    cl.ack(1, 4)
    assert cl.unsent_bytes() == 0


# -- watermarks ------------------------------------------------------------------------------

def test_watermark_is_the_next_unsent_record_or_now() -> None:
    clock = FakeClock(100)
    cl = new_log(clock=clock)
    write(cl, 0, b"a")
    clock.advance(10)
    write(cl, 8, b"b")
    clock.advance(10)
    records, watermark = cl.take(HDR + 1, 0)
    assert seqs(records) == [1] and watermark == 110  # record 2 (at 110) is still queued
    records, watermark = cl.take(1 << 20, 0)
    assert seqs(records) == [2] and watermark == 120  # drained: now


def test_watermark_stays_where_the_disk_became_inconsistent() -> None:
    clock = FakeClock(100)
    cl = new_log(queue_limit=HDR + 4, clock=clock)
    write(cl, 0, b"x" * 4)                # queued
    clock.advance(10)
    write(cl, 64, b"y" * 4)               # does not fit: dirty at 110, in no record
    clock.advance(10)
    _records, watermark = cl.take(1 << 20, 0)
    assert watermark == 110
    clock.advance(100)
    assert cl.take(1 << 20, 0) == ([], 110)

