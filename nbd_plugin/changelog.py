"""The splitter's change log: what a disk's writes owe the target site.

Theory of operation
-------------------
A guest write goes through three steps, all in the caller's thread:

1. ``begin(offset, length)`` takes a range lock: a write never runs beside another write,
   or a resync read, that overlaps it. Non-overlapping writes run in parallel.
2. The caller writes the local disk (the VM's write, with its flags, comes first).
3. ``commit(...)`` gives the change the next sequence number and puts it in the queue,
   then drops the range lock. Because the sequence number is taken while the range is
   locked and after the local write, two overlapping writes get sequence numbers in the
   order the disk saw them, and the sequence order is the order in which writes
   completed: any prefix of the stream is a crash-consistent state of the disk.

The queue holds every record the target has not acked yet, split in *sent* and *unsent*,
and is bounded in bytes. A change that does not fit is not queued: its range goes to the
dirty map and the stream becomes inconsistent (records carry ``FLAG_INCONSISTENT``) until a
resync has read every dirty range back from the disk (``resync_take`` / ``commit`` with
``FLAG_RESYNC``, under the same range lock), at which point a ``KIND_CONSISTENT`` marker
tells the target that the stream is whole again. Nothing here ever blocks a writer for
longer than an overlapping write or resync read takes.

The link thread drains the queue with ``take``, and ``ack`` frees it. After a reconnect,
``rewind`` makes every unacked record unsent again so it is sent once more; the target
drops the duplicates by sequence number.

One class in one module on purpose (about 470 lines): the queue, the range lock, the dirty
map's hand-off and the resync all change under one lock, and the order of their steps is
the crash-consistency argument above; split, that argument would span files.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple, Union

from formats.localwire import (
    FLAG_INCONSISTENT,
    FLAG_RESYNC,
    KIND_CONSISTENT,
    KIND_FLUSH,
    KIND_WRITE,
    RECORD,
    Record,
)

from .activity import ActivityLog
from .dirtymap import DirtyMap
from .ioerrors import IoErrors, WrittenSinceFlush

Clock = Callable[[], int]

# Writes larger than this become several records (consecutive sequence numbers, queued
# together), so a record always fits a frame however large the client's request.
RECORD_DATA_MAX = 4 * 1024 * 1024


def _pieces(data: Union[bytes, bytearray, memoryview], length: int) -> List[bytes]:
    """``data`` as bytes of at most RECORD_DATA_MAX each (a copy unless it is bytes)."""
    if length <= RECORD_DATA_MAX:
        return [data if isinstance(data, bytes) else bytes(data)]
    view = memoryview(data)
    return [bytes(view[pos:pos + RECORD_DATA_MAX]) for pos in range(0, length, RECORD_DATA_MAX)]


class Stats:
    """Counters for status and metrics; read without the lock (torn reads are harmless)."""

    def __init__(self) -> None:
        self.written_bytes = 0      # bytes of guest writes, zeroes and trims
        self.queued_records = 0     # records ever queued
        self.dirtied_bytes = 0      # bytes of changes that went to the dirty map
        self.resync_bytes = 0       # bytes read back from the disk by resyncs
        self.sent_bytes = 0         # record bytes handed to the agent


class ChangeLog:
    def __init__(
        self,
        gen: int,
        queue_limit: int,
        dirty: Optional[DirtyMap] = None,
        clock: Clock = time.monotonic_ns,
        activity: Optional[ActivityLog] = None,
    ) -> None:
        self.gen = gen
        self.queue_limit = queue_limit
        self.dirty = dirty if dirty is not None else DirtyMap()
        self.stats = Stats()
        self._clock = clock
        self._lock = threading.Lock()
        self._range_free = threading.Condition(self._lock)
        self._work = threading.Condition(self._lock)
        self._inflight: Dict[int, Tuple[int, int]] = {}
        self._next_token = 1
        self._range_waiters = 0
        self._takers = 0  # link threads waiting in take()
        self._sent: Deque[Record] = deque()
        self._unsent: Deque[Record] = deque()
        self._queued_bytes = 0
        self._sent_bytes = 0  # of the queued bytes, those in records sent and not acked
        self._next_seq = 1
        self._acked_seq = 0
        self._resyncing = 0          # resync reads taken but not committed yet
        self._resync_regions: List[Tuple[int, int]] = []  # and their ranges
        self._inconsistent = bool(self.dirty)
        self._inconsistent_since = clock() if self._inconsistent else 0
        self._unflushed = False
        self._sync_waiting: List[str] = []
        self._sync_ready: List[Tuple[str, int]] = []
        self._closed = False
        self.initial = False  # the open dirty epoch is the initial sync of a new protection
        # The seq of the last ``consistent`` record, and whether it ended an initial sync:
        # until the target acks it, site B cannot yet give back a consistent disk.
        self._consistent_seq = 0
        self._consistent_initial = False
        self.io_errors = IoErrors()  # failed I/O on the disk (ioerrors.py)
        # Why writes are refused (the group failed over to its target site), or None.
        # Set by the link's reader thread, read by nbdkit's threads without the lock.
        self.fenced: Optional[str] = None
        self._since_flush = WrittenSinceFlush()
        # The activity log, and per extent the highest seq of a record queued in it: the
        # extent holds an unacked record while that is above _acked_seq (see activity.py).
        self.activity = activity
        self._extent_seq: Dict[int, int] = {}
        # Ranges owed from before this run were all read back into records: the state
        # file need not carry them any more (the activity log covers those records).
        self.carried_done = False

    # -- the write path ------------------------------------------------------------------

    def begin(self, offset: int, length: int) -> int:
        """Lock ``[offset, offset + length)`` against overlapping writes; return a token."""
        end = offset + length
        with self._lock:
            while self._overlaps_inflight(offset, end):
                self._range_waiters += 1
                try:
                    self._range_free.wait()
                finally:
                    self._range_waiters -= 1
            token = self._next_token
            self._next_token += 1
            self._inflight[token] = (offset, end)
            if self.activity is not None and not self.activity.covers(offset, length):
                # Durably in the activity log before the disk is written (a rare fsync).
                try:
                    self.activity.ensure(offset, length, self._is_cold)
                except BaseException:
                    self._release(token)
                    raise
            return token

    def _overlaps_inflight(self, offset: int, end: int) -> bool:
        for s, e in self._inflight.values():  # a loop: cheaper than any() over a generator
            if s < end and offset < e:
                return True
        return False

    def release(self, token: int) -> None:
        """Drop a range lock without recording a change (the local write failed)."""
        with self._lock:
            self._release(token)

    def _release(self, token: int) -> None:
        del self._inflight[token]
        if self._range_waiters:
            self._range_free.notify_all()

    def commit(
        self,
        token: int,
        kind: int,
        offset: int,
        length: int,
        data: Optional[Union[bytes, bytearray, memoryview]] = None,
        flags: int = 0,
    ) -> None:
        """Record a change made to the disk under ``token`` and drop the range lock.

        ``data`` may be a buffer the caller reuses once this returns (nbdkit's): the change
        log keeps a copy only if it queues the change, so a change that goes to the dirty
        map costs no copy. The copy is made before the lock is taken when the queue looks
        like having room (and under the lock in the rare case it gained room meanwhile)."""
        if kind == KIND_WRITE:
            nbytes = -(-length // RECORD_DATA_MAX) * RECORD.size + length
        else:
            nbytes = RECORD.size
        pieces = None
        if (data is not None and not flags & FLAG_RESYNC
                and self._queued_bytes + nbytes <= self.queue_limit):
            pieces = _pieces(data, length)  # a read without the lock: only a guess
        with self._lock:
            self._release(token)
            self.stats.written_bytes += length if not flags & FLAG_RESYNC else 0
            if flags & FLAG_RESYNC:
                # Admitted by resync_take, which checked there was room.
                self._resyncing -= 1
                self._resync_regions.remove((offset, length))
                self.stats.resync_bytes += length
                self._append(kind, offset, length, None if data is None else bytes(data),
                             flags)
                self._maybe_consistent()
                return
            self._since_flush.add(offset, length)
            if self._queued_bytes + nbytes > self.queue_limit:
                was_clean = not self.dirty
                self.dirty.add(offset, length)
                self.stats.dirtied_bytes += length
                self._set_inconsistent()
                self._unflushed = True
                if was_clean:
                    # The link learns that there is a map to resync. Later writes into it
                    # need not wake it: the queue is full, so it can resync nothing before
                    # an ack frees room, and an ack wakes it (a wake per write cost a
                    # thread switch and a handoff of the interpreter's lock each).
                    self._wake()
                return
            if data is None:
                self._append(kind, offset, length, None, flags)
            else:
                if pieces is None:
                    pieces = _pieces(data, length)
                pos = offset
                for piece in pieces:
                    self._append(kind, pos, len(piece), piece, flags)
                    pos += len(piece)
            self._unflushed = True

    def failed(self, token: int, offset: int, length: int, what: str) -> None:
        """The write, zero or trim under ``token`` failed on the disk: drop the range lock
        and owe the range, now of unknown content (ioerrors.py)."""
        with self._lock:
            self._release(token)
            self.io_errors.failed(what, owes=True)
            self._owe([(offset, length)])

    def flush_failed(self, what: str) -> None:
        """The disk's flush failed: every change since the last good flush is owed."""
        with self._lock:
            self.io_errors.failed(what, owes=True)
            self._owe(self._since_flush.take())

    def read_failed(self, what: str) -> None:
        """A guest read failed: counted and shown; it changed nothing."""
        with self._lock:
            self.io_errors.failed(what, owes=False)

    def _owe(self, ranges: List[Tuple[int, int]]) -> None:
        for offset, length in ranges:
            self.dirty.add(offset, length)
        self._set_inconsistent()
        self._unflushed = True
        self._wake()

    def flush(self) -> None:
        """Record an ordering point after the disk was flushed (only if anything changed)."""
        with self._lock:
            self._since_flush.take()
            if not self._unflushed:
                return
            self._unflushed = False
            if self._queued_bytes + RECORD.size <= self.queue_limit:
                self._append(KIND_FLUSH, 0, 0, None, 0)

    def _append(self, kind: int, offset: int, length: int, data: Optional[bytes],
                flags: int) -> None:
        if self._inconsistent:
            flags |= FLAG_INCONSISTENT
        seq = self._next_seq
        self._next_seq = seq + 1
        self._unsent.append(Record(seq, self._clock(), offset, length, self.gen, kind, flags,
                                   data))
        if length and self.activity is not None:
            shift = self.activity.shift
            first, last = offset >> shift, (offset + length - 1) >> shift
            if first == last:
                self._extent_seq[first] = seq
            else:
                for e in range(first, last + 1):
                    self._extent_seq[e] = seq
        self._queued_bytes += RECORD.size + (len(data) if data is not None else 0)
        self.stats.queued_records += 1
        if self._takers:
            self._work.notify()

    def _is_cold(self, extent: int) -> bool:
        """Nothing in the extent is owed to the target: it may leave the activity log."""
        if self._extent_seq.get(extent, 0) > self._acked_seq:
            return False
        assert self.activity is not None
        start = extent << self.activity.shift
        end = start + self.activity.extent_size
        if any(s < end and start < e for s, e in self._inflight.values()):
            return False
        if any(o < end and start < o + n for o, n in self._resync_regions):
            return False
        return not self.dirty.intersects(start, end)

    def trim_activity(self, now: float, idle: float) -> int:
        """Let extents that are cold and idle leave the activity log; how many left."""
        if self.activity is None:
            return 0
        with self._lock:
            self.activity.now = now
            slots = self.activity.detach_idle(self._is_cold, idle)
            if len(self._extent_seq) > 1024:
                # Forget extents whose records are all acked (they read as cold anyway).
                acked = self._acked_seq
                self._extent_seq = {e: q for e, q in self._extent_seq.items() if q > acked}
        if slots:
            # Their slots are out of the log's map already: a write to one of those
            # extents now takes a fresh slot, durably, as any new extent does.
            self.activity.clear_slots(slots)
            with self._lock:
                self.activity.release_slots(slots)
        return len(slots)

    def _wake(self) -> None:
        """Wake the link thread if it waits for work (a notify nobody waits for is not free)."""
        if self._takers:
            self._work.notify()

    def _set_inconsistent(self) -> None:
        if not self._inconsistent:
            self._inconsistent = True
            self._inconsistent_since = self._clock()

    def _maybe_consistent(self) -> None:
        if self._inconsistent and not self.dirty and not self._resyncing:
            self._inconsistent = False
            self._consistent_initial = self.initial
            self.initial = False
            self.carried_done = True
            self._append(KIND_CONSISTENT, 0, 0, None, 0)
            seq = self._next_seq - 1
            self._consistent_seq = seq
            self.io_errors.resolved()
            self._sync_ready.extend((token, seq) for token in self._sync_waiting)
            self._sync_waiting.clear()

    # -- resync --------------------------------------------------------------------------

    def resync_take(self, max_length: int) -> Optional[Tuple[int, int, int]]:
        """Take a dirty range to read back from the disk, range-locked, if the queue has
        room for it: ``(offset, length, token)``; the caller reads the disk and calls
        ``commit(token, ..., flags=FLAG_RESYNC)`` or ``resync_abort``."""
        with self._lock:
            if not self.dirty or self._queued_bytes + RECORD.size + max_length > self.queue_limit:
                return None
            region = self.dirty.pop(max_length)
            assert region is not None
            offset, length = region
            self._resyncing += 1
            # Neither dirty nor range-locked until begin() returns: owed all the same.
            self._resync_regions.append(region)
        try:
            token = self.begin(offset, length)
        except BaseException:
            self.resync_abort(None, offset, length)
            raise
        return offset, length, token

    def resync_abort(self, token: Optional[int], offset: int, length: int) -> None:
        """The read failed: put the range back in the dirty map."""
        with self._lock:
            if token is not None:
                self._release(token)
            self._resyncing -= 1
            self._resync_regions.remove((offset, length))
            self.dirty.add(offset, length)

    def mark_dirty(self, ranges: List[Tuple[int, int]]) -> None:
        """Ranges owed from before this run (initial sync, a restart): resync them."""
        with self._lock:
            for offset, length in ranges:
                self.dirty.add(offset, length)
            if self.dirty:
                self._set_inconsistent()
                self._wake()

    # -- the link side -------------------------------------------------------------------

    def take(self, max_bytes: int, timeout: float) -> Tuple[List[Record], int]:
        """Move up to ``max_bytes`` of unsent records to sent and return them (at least
        one if any is unsent), with a watermark: every change that completed before the
        watermark is in these records or in earlier ones. Waits up to ``timeout`` seconds
        for work."""
        with self._lock:
            if not self._unsent and not self._closed and timeout > 0:
                self._takers += 1
                try:
                    self._work.wait(timeout)
                finally:
                    self._takers -= 1
            out: List[Record] = []
            size = 0
            unsent, sent = self._unsent, self._sent
            while unsent:
                r = unsent[0]
                n = RECORD.size + (len(r.data) if r.data is not None else 0)
                if out and size + n > max_bytes:
                    break
                sent.append(unsent.popleft())
                out.append(r)
                size += n
            self.stats.sent_bytes += size
            self._sent_bytes += size
            # Records are appended in time order under this lock: with the queue drained,
            # nothing that completed before now is left behind; otherwise, the next
            # record's time bounds what these cover. A change that went to the dirty map
            # is in no record: while the disk is inconsistent the watermark stays at the
            # moment it became so, and passes it only with the KIND_CONSISTENT marker.
            watermark = self._unsent[0].time_ns if self._unsent else self._clock()
            if self._inconsistent:
                watermark = min(watermark, self._inconsistent_since)
            return out, watermark

    def has_work(self) -> bool:
        with self._lock:
            return bool(self._unsent or self._sync_ready)

    def unsent_bytes(self) -> int:
        with self._lock:
            return self._queued_bytes - self._sent_bytes

    def ack(self, gen: int, seq: int) -> None:
        """The target holds every record up to ``seq`` durably: free them."""
        if gen != self.gen:
            return
        with self._lock:
            if seq <= self._acked_seq:
                return
            self._acked_seq = seq
            freed = freed_sent = 0
            sent, unsent = self._sent, self._unsent
            while sent and sent[0].seq <= seq:
                data = sent.popleft().data
                freed_sent += RECORD.size + (len(data) if data is not None else 0)
            while unsent and unsent[0].seq <= seq:
                data = unsent.popleft().data
                freed += RECORD.size + (len(data) if data is not None else 0)
            self._queued_bytes -= freed + freed_sent
            self._sent_bytes -= freed_sent
            self._wake()

    def rewind(self) -> None:
        """A new connection: everything not acked must be sent again, oldest first."""
        with self._lock:
            self._sent.extend(self._unsent)
            self._unsent = self._sent
            self._sent = deque()
            self._sent_bytes = 0

    def request_sync(self, token: str) -> None:
        """Ask for the sequence number that covers every change made before this call;
        the answer comes out of ``sync_replies`` once no region is left dirty."""
        with self._lock:
            if self._inconsistent:
                self._sync_waiting.append(token)
            else:
                self._sync_ready.append((token, self._next_seq - 1))
            self._wake()

    def sync_replies(self) -> List[Tuple[str, int]]:
        with self._lock:
            out, self._sync_ready = self._sync_ready, []
            return out

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._work.notify_all()

    # -- views for status and persistence ------------------------------------------------

    def counters(self) -> Dict[str, Any]:
        with self._lock:
            oldest = self._sent[0] if self._sent else (self._unsent[0] if self._unsent else None)
            now = self._clock()
            since = oldest.time_ns if oldest is not None else now
            if self._inconsistent:
                since = min(since, self._inconsistent_since)
            return {
                "gen": self.gen,
                "next_seq": self._next_seq,
                "acked_seq": self._acked_seq,
                "queued_bytes": self._queued_bytes,
                "queued_records": len(self._sent) + len(self._unsent),
                "queue_limit": self.queue_limit,
                "dirty_bytes": self.dirty.bytes,
                "dirty_ranges": len(self.dirty),
                "dirty_coarsened_bytes": self.dirty.coarsened_bytes,
                "dirty_granularity": self.dirty.granularity,
                "inconsistent": int(self._inconsistent),
                "initial": int(self.initial),
                "consistent_seq": self._consistent_seq,
                "consistent_initial": int(self._consistent_initial),
                **self.io_errors.counters(),
                "fenced": int(self.fenced is not None),
                "lag_ns": now - since,
                "written_bytes": self.stats.written_bytes,
                "dirtied_bytes": self.stats.dirtied_bytes,
                "resync_bytes": self.stats.resync_bytes,
                "sent_bytes": self.stats.sent_bytes,
            }

    def owed_ranges(self) -> List[Tuple[int, int]]:
        """Every range the target may lack: the dirty map plus every unacked change."""
        with self._lock:
            m = self.dirty.copy()
            for q in (self._sent, self._unsent):
                for r in q:
                    if r.length:
                        m.add(r.offset, r.length)
            for offset, end in self._inflight.values():
                m.add(offset, end - offset)
            for offset, length in self._resync_regions:
                m.add(offset, length)
            return m.ranges()
