"""The agent's side of one protected disk: a splitter's socket as a ``ChangeStream``.

The splitter (``intake`` reads its socket) hands its records here; the ``cursor`` says which
to forward, and this class does what it says: REWIND and ACK messages to the splitter,
records to the shipper. It also keeps the splitter's counters (status, RPO) and what was
shipped.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Tuple

import trio

from formats import localwire as lw
from formats.records import KIND_SEEDED

from ..protocol.cursor import CursorState
from ..protocol.cursor import ForwardCursor as Cursor
from ..store import DiskRow
from .changes import ChangeSink, Point

log = logging.getLogger("ferry.source")


class DiskLink:
    """The agent's side of one protected disk."""

    def __init__(self, row: DiskRow) -> None:
        self.row = row
        self.stream: Optional[trio.SocketStream] = None
        self.gen = 0
        self.counters: Dict[str, Any] = {}
        self.counters_at = 0.0
        self.acked: Point = (0, 0)
        self.cursor = Cursor()
        self.shipped_bytes = 0
        self.shipped_records = 0
        self.resync_skipped_bytes = 0   # resync data site B's seed already held
        self._send_lock = trio.Lock()
        self.sync_replies: Dict[str, Point] = {}
        self.resync_start: Optional[int] = None    # resync_bytes when this resync began
        self.resync_rate: Optional[float] = None   # bytes/s, smoothed
        self.sink: Optional[ChangeSink] = None
        self.index = row.index
        self.fenced: Optional[str] = None  # why the splitter must refuse writes, or None
        self.fence_told = False  # whether this agent has decided the fence (either way)
        self.can_fence = False             # its HELLO said it understands MSG_FENCE
        self.can_resync = False            # ... and MSG_RESYNC

    @property
    def connected(self) -> bool:
        return self.stream is not None

    @property
    def error(self) -> Optional[str]:
        return self.cursor.error

    @property
    def broken(self) -> bool:
        return self.cursor.state is CursorState.BROKEN

    # -- the splitter's side (intake) ------------------------------------------------------

    async def attach(self, stream: trio.SocketStream, gen: int, can_fence: bool = False,
                     can_resync: bool = False) -> None:
        """A splitter of generation ``gen`` connected: it replaces any earlier one."""
        if self.stream is not None:
            await self.stream.aclose()
        self.stream = stream
        self.can_fence = can_fence
        self.can_resync = can_resync
        if self.fenced is not None or self.fence_told:
            await self._send_fence()
        old_gen, self.gen = self.gen, gen
        assert self.sink is not None
        if old_gen and self.gen != old_gen:
            self.sink.restarted(self.index)
        log.info("splitter for %s/%s connected (generation %d)",
                 self.row.group, self.row.name, self.gen)
        if self.sink.live:
            await self.start_forwarding(self.acked)

    def detach(self, stream: trio.SocketStream) -> None:
        """That splitter connection ended (unless a newer one took its place)."""
        if self.stream is stream:
            self.stream = None
            self.cursor.stop()

    async def received(self, watermark: int, records: List[lw.Record]) -> None:
        """A splitter's RECORDS message: the ones in sequence go to the shipper."""
        records, whole = await self.filter(records)
        assert self.sink is not None
        await self.sink.deliver(self.index, records, watermark, whole)

    def update_counters(self, counters: Dict[str, Any], now: float) -> None:
        """A splitter's STATE: keep it, and follow how fast a resync goes."""
        resync = int(counters.get("resync_bytes", 0))
        if counters.get("inconsistent"):
            if self.resync_start is None or resync < self.resync_start:
                self.resync_start = resync
            elif self.counters_at and now > self.counters_at:
                rate = (resync - int(self.counters.get("resync_bytes", 0))) / \
                    (now - self.counters_at)
                self.resync_rate = rate if self.resync_rate is None else \
                    0.7 * self.resync_rate + 0.3 * rate
        else:
            self.resync_start = None
            self.resync_rate = None
        self.counters = counters
        self.counters_at = now

    def resync_progress(self) -> Dict[str, Any]:
        """How far the running resync (or initial sync) is, and when it should end."""
        if self.resync_start is None:
            return {"resync_progress": None, "resync_eta_seconds": None}
        done = int(self.counters.get("resync_bytes", 0)) - self.resync_start
        left = int(self.counters.get("dirty_bytes", 0))
        eta = None
        if self.resync_rate and self.resync_rate > 0:
            eta = round(left / self.resync_rate, 1)
        return {"resync_progress": round(done / (done + left), 4) if done + left else 1.0,
                "resync_eta_seconds": eta}

    async def send(self, msg: bytes) -> None:
        stream = self.stream
        if stream is None:
            return
        try:
            async with self._send_lock:
                await stream.send_all(msg)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the reader notices and detaches

    def covers(self, point: Point) -> bool:
        """Has the target acked, and the splitter heard it, everything up to ``point``?
        Sequence 0 is a generation with nothing written yet: nothing to wait for."""
        gen, seq = point
        if seq == 0:
            return True
        return self.acked >= point and self.counters.get("gen") == gen \
            and self.counters.get("acked_seq", 0) >= seq

    # -- ChangeStream (the shipper's side) ---------------------------------------------------

    def bind(self, sink: ChangeSink, index: int) -> None:
        self.sink, self.index = sink, index

    @property
    def inconsistent(self) -> bool:
        return bool(self.counters.get("inconsistent"))

    async def start_forwarding(self, durable: Point) -> None:
        """A session (or a splitter connection) begins: forward from what the target holds."""
        self.acked = max(self.acked, durable) if self.gen == durable[0] else durable
        if not self.connected:
            self.cursor.stop()
            return
        start = self.cursor.start(self.gen, durable, trio.current_time())
        if self.cursor.state is CursorState.BROKEN:
            log.error("disk %s: %s", self.row.name, self.error)
            return
        if start.ack is not None:
            await self.send(lw.pack_ack(*start.ack))
        if start.rewind:
            await self.send(lw.pack_json(lw.MSG_REWIND, {}))

    def stop_forwarding(self) -> None:
        self.cursor.stop()

    @property
    def unreplicated_bytes(self) -> int:
        return int(self.counters.get("queued_bytes", 0)) + int(
            self.counters.get("dirty_bytes", 0))

    async def fence(self, reason: Optional[str]) -> None:
        """Make the splitter refuse writes (EROFS) for ``reason``, or take them again
        (None); a splitter that connects later is told when it does."""
        if reason == self.fenced:
            if reason is None and not self.fence_told:
                # A splitter that outlived this agent may still refuse writes from an
                # earlier agent's fence: the target takes the group, so say so once.
                self.fence_told = True
                await self._send_fence()
            return
        self.fence_told = True
        self.fenced = reason
        log.warning("%s/%s: %s", self.row.group, self.row.name,
                    "writes refused: %s" % reason if reason else "writes taken again")
        await self._send_fence()

    async def resync(self, ranges: List[Tuple[int, int]]) -> bool:
        """Have the splitter read these ranges of its disk again and send them (a repair);
        False when no splitter that can is connected (the ranges are not owed then)."""
        if self.stream is None or not self.can_resync:
            return False
        for start in range(0, len(ranges), lw.MAX_RESYNC_RANGES):
            await self.send(lw.pack_json(lw.MSG_RESYNC, {
                "ranges": [list(r) for r in ranges[start:start + lw.MAX_RESYNC_RANGES]]}))
        log.warning("%s/%s: %d range(s), %d bytes, to be read again and sent (repair)",
                    self.row.group, self.row.name, len(ranges), sum(n for _o, n in ranges))
        return True

    async def _send_fence(self) -> None:
        if not self.can_fence:
            if self.fenced is not None and self.stream is not None:
                log.error("%s/%s: its splitter is too old to refuse writes; stop the VM "
                          "writing to it", self.row.group, self.row.name)
            return
        await self.send(lw.pack_json(lw.MSG_FENCE, {"fenced": self.fenced is not None,
                                                    "reason": self.fenced or ""}))

    async def ack(self, durable: Point) -> None:
        if durable > self.acked:
            self.acked = durable
            if durable[0] == self.gen:
                await self.send(lw.pack_ack(*durable))

    def shipped(self, record: Any) -> None:
        if record.kind == KIND_SEEDED:
            self.resync_skipped_bytes += record.length
        elif record.data is not None:
            self.shipped_bytes += record.length
        self.shipped_records += 1

    async def filter(self, records: List[lw.Record]) -> Tuple[List[lw.Record], bool]:
        """The records to forward, strictly in sequence (``Cursor.take``); asks for a
        rewind on a gap. The flag says the whole batch was taken."""
        was_broken = self.broken
        taken = self.cursor.take(
            records, (self.counters.get("gen"), self.counters.get("acked_seq", 0)),
            trio.current_time())
        if self.broken and not was_broken:
            log.error("disk %s: %s", self.row.name, self.error)
        if taken.rewind:
            await self.send(lw.pack_json(lw.MSG_REWIND, {}))
        return taken.records, taken.whole
