"""A group's checkpoints on the source, from the request to the target's ack (no I/O).

Theory of operation
-------------------
The shipper feeds a ``checkpoints.Cutter`` through this book with what it forwards and with
each splitter batch's watermark; a checkpoint is requested (every ``checkpoint_interval``
seconds by the shipper's ticker, or by a user through the API), and ``resolve`` collects the
cuts the cutter can now make. A cut checkpoint is *unacked*: it goes out with the first
BATCH sent after every record of its cut (``sendable``, ``sending``), once a session, and is
sent again in the next session until the target acks it (``acked``). A user's request has a
waiter (a ``trio.Event``) woken with its result: "ok" once acked, or why no cut was possible.
An automatic checkpoint whose cut equals the previous one is dropped: nothing changed.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from typing import Any, Deque, Dict, List, Optional, Sequence, Set, Tuple

import trio

from ..checkpoints import Checkpoint, Cutter, Point, Request

log = logging.getLogger("ferry.source")

CHECKPOINTS_KEPT = 10000  # the source's list of checkpoints it made (since it started)
CLOCK_OFFSET_TTL = 60 * 10**9  # the wall clock's offset from CLOCK_MONOTONIC is read again after


class WallClock:
    """Wall times of CLOCK_MONOTONIC instants, in the order of those instants.

    A checkpoint is a monotonic instant (``checkpoints.py``); ``--at`` chooses among them by
    their wall times, so those must keep the instants' order. Reading both clocks anew for
    each checkpoint does not: a thread preempted between the two reads dates a later
    checkpoint before an earlier one, and ``--at`` then names a point holding writes made
    after the time asked. The offset is read as the tightest of three paired reads, kept a
    minute, and every wall time is at least one more than the last one given.
    """

    def __init__(self) -> None:
        self._offset = 0
        self._read_at: Optional[int] = None
        self._last = 0

    def _read_offset(self) -> int:
        best: Optional[Tuple[int, int]] = None
        for _ in range(3):
            m0 = time.monotonic_ns()
            wall = time.time_ns()
            m1 = time.monotonic_ns()
            if best is None or m1 - m0 < best[0]:
                best = (m1 - m0, wall - (m0 + m1) // 2)
        assert best is not None
        return best[1]

    def wall_ns(self, mono_ns: int) -> int:
        now = time.monotonic_ns()
        if self._read_at is None or now - self._read_at > CLOCK_OFFSET_TTL:
            self._offset, self._read_at = self._read_offset(), now
        self._last = max(self._offset + mono_ns, self._last + 1)
        return self._last


class CheckpointBook:
    def __init__(self, group: str, ndisks: int) -> None:
        self.group = group
        self.cutter = Cutter(ndisks)
        self.made: Deque[Dict[str, Any]] = deque(maxlen=CHECKPOINTS_KEPT)
        self.unacked: Dict[str, Checkpoint] = {}   # cut, not yet acked, oldest first
        self.waiters: Dict[str, trio.Event] = {}
        self.cut_waiters: Dict[str, trio.Event] = {}  # set once cut (or impossible)
        self.results: Dict[str, str] = {}
        self._last_cut: Optional[List[Point]] = None
        self._clock = WallClock()
        self._sent_upto: List[Point] = []
        self._sent_ids: Set[str] = set()

    # -- what the shipper forwards ---------------------------------------------------------

    def session_started(self, durable: Sequence[Point]) -> None:
        """A session opened and the target holds ``durable``: nothing is sent yet."""
        for req in self.cutter.reset(durable):
            self._finished(req)
        self._sent_upto = list(durable)
        self._sent_ids = set()

    def restarted(self, disk: int) -> None:
        """Disk ``disk``'s splitter started a new generation."""
        for req in self.cutter.restarted(disk):
            self._finished(req)

    def forwarded(self, disk: int, records: Sequence[Any]) -> None:
        self.cutter.forwarded(disk, records)

    def watermark(self, disk: int, watermark_ns: int) -> None:
        self.cutter.watermark(disk, watermark_ns)

    # -- requests and cuts -----------------------------------------------------------------

    def request(self, kind: str, tag: Optional[str] = None) -> Request:
        c = Checkpoint(uuid.uuid4().hex[:12], time.monotonic_ns(), kind, tag)
        if kind != "auto":  # someone waits for it (a user checkpoint, a move)
            self.waiters[c.id] = trio.Event()
        return self.cutter.request(c)

    def pending(self) -> bool:
        return bool(self.cutter.pending())

    def resolve(self) -> None:
        """Collect the cuts the cutter can make now."""
        for req in self.cutter.resolve():
            self._finished(req)

    def _finished(self, req: Request) -> None:
        c = req.checkpoint
        cut = self.cut_waiters.pop(c.id, None)
        if cut is not None:
            cut.set()
        if req.result != "ok":
            if c.kind != "auto":
                log.warning("group %s: checkpoint %s impossible: %s", self.group, c.id,
                            req.result)
                self.results[c.id] = str(req.result)
                self._wake(c.id)
            return
        if c.kind == "auto" and c.cut == self._last_cut:
            return  # nothing changed since the last checkpoint
        self._last_cut = list(c.cut)
        c.wall_ns = self._clock.wall_ns(c.time_ns)
        self.unacked[c.id] = c
        self.made.append(dict(c.to_json(), acked=False))

    # -- sending and acks ------------------------------------------------------------------

    def sendable(self) -> List[Checkpoint]:
        """Cut checkpoints not sent in this session whose every record has been sent."""
        return [c for c in self.unacked.values() if c.id not in self._sent_ids
                and all(s >= cut for s, cut in zip(self._sent_upto, c.cut))]

    def sending(self, items: Sequence[Tuple[int, Any]]) -> List[Checkpoint]:
        """These records go out now: the checkpoints to send with them (marked sent)."""
        for i, r in items:
            self._sent_upto[i] = (r.gen, r.seq)
        ready = self.sendable()
        self._sent_ids.update(c.id for c in ready)
        return ready

    def acked(self, ids: List[str]) -> None:
        """The target journaled these checkpoints."""
        for cid in ids:
            if self.unacked.pop(cid, None) is None:
                continue
            for entry in reversed(self.made):
                if entry["id"] == cid:
                    entry["acked"] = True
                    break
            self.results[cid] = "ok"
            self._wake(cid)

    def _wake(self, cid: str) -> None:
        event = self.waiters.pop(cid, None)
        if event is not None:
            event.set()
