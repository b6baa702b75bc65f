"""A group's shipper: one session at a time with the target, carrying its disks' changes.

Theory of operation
-------------------
A group has one shipper and, while the target is reachable, one session (one TCP
connection). The shipper ships ``ChangeStream``s (``changes.py``) and knows nothing else of
the disks. When a session opens (``handshake.open_session``), the target says what it holds
(per disk, the newest durable ``(gen, seq)``); the shipper tells each stream to start
forwarding from there, and the streams deliver their records in sequence into one bounded
channel, so a slow link pushes back on the splitters, whose queues fill and spill into
their dirty maps: the VM never waits. Three tasks run the session: ``_send`` batches what
the channel holds into BATCH frames (``_send_batch``, within the bandwidth limit),
``_receive_acks`` passes the target's ACKs back to the streams and the checkpoint book, and
``_tick`` asks for automatic checkpoints and nudges the sender when a cut checkpoint waits,
and ``_heartbeat`` keeps the link honest: an idle link is pinged every third of the stall
timeout (an empty BATCH, which the target answers with an ACK like any other), and a link on
which something was sent but nothing came back for ``stall_timeout`` seconds (a hung agent, a
frozen relay whose TCP stack still answers) ends the session with ``LinkStalled``.
Connecting and the handshake are bounded by the same timeout.
The first of them to fail ends the session; the shipper shows why (``ShipperState``),
waits a backoff and connects again. ``pause`` ends the session until ``resume``.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import trio

from formats import localwire as lw

from ..checkpoints import iso as iso_time
from ..pairing import NotPaired, how_to_pair
from ..protocol import frames, messages
from ..protocol.stream import SessionStream, race
from ..store import GroupRow
from ..throttle import TokenBucket
from .changes import ChangeStream
from .checkpointing import CheckpointBook
from .handshake import Connector, open_session, plain_connect, session_stream
from .seeds import SeedList, substitute
from .settings import DEFAULT_SETTINGS, parse_target
from .states import ShipperState

log = logging.getLogger("ferry.source")

MAX_BATCH = 4 * 1024 * 1024
FENCED_RETRY = 30.0  # seconds between asks while the target holds the group failed over
CHECKPOINT_TICK = 0.05
class LinkStalled(Exception):
    """Nothing came back from the target for the stall timeout while data was owed."""


# The state a group shows when the target ends a session with this error code.
REMOTE_STATES = {frames.E_STORAGE: ShipperState.TARGET_STORAGE_ERROR,
                 frames.E_JOURNAL_FULL: ShipperState.JOURNAL_FULL,
                 frames.E_FAILED_OVER: ShipperState.FENCED,
                 frames.E_TLS_REQUIRED: ShipperState.TARGET_UNPAIRED,
                 frames.E_UNPAIRED: ShipperState.TARGET_UNPAIRED}


class GroupShipper:
    def __init__(self, row: GroupRow, site_id: str, links: Sequence[ChangeStream],
                 connect: Connector = plain_connect) -> None:
        self.row = row
        self.connect = connect
        self.site_id = site_id
        self.links = list(links)
        self.host, self.port = parse_target(row.target)
        self.state = ShipperState.CONNECTING
        self.error: Optional[str] = None
        self.channel: Optional[trio.MemorySendChannel] = None
        self.cancel_scope = trio.CancelScope()
        self.bytes_sent = 0
        self._received = 0  # by sessions that ended
        self._fs: Optional[SessionStream] = None
        self.seeds: List[Optional[SeedList]] = []  # site B's, for this session
        self.connected_since: Optional[float] = None
        self.settings = dict(DEFAULT_SETTINGS, **row.settings)
        self.bucket = TokenBucket(float(self.settings["bandwidth"]))
        self.paused = bool(self.settings.get("paused"))
        self._resumed = trio.Event()
        self._session_scope = trio.CancelScope()
        self.book = CheckpointBook(row.name, len(self.links))
        self._nudged = False
        self.stall_timeout = float(self.settings["stall_timeout"])
        self._waiting_since: Optional[float] = None  # first send the target has not answered
        self._last_send = 0.0
        self._ping = False
        self.link_state = "connecting"  # connected | connecting | down, for status
        self.fenced: Optional[str] = None  # why the splitters refuse writes (see _fence)
        self.owed_repairs: dict = {}  # disk index -> ranges B asked for, no splitter then
        self.fenced_since = 0.0
        self.split_brain: Optional[Dict[str, Any]] = None  # see _split_brain
        self.link_since = time.time()
        # Site B's journal refused a write (E_JOURNAL_FULL): told as it happens, and once the
        # next ack shows it takes writes again (Watcher.journal_refused / journal_resumed).
        self.journal_refused: Callable[[str, str, str], Any] = lambda *args: None
        self.journal_resumed: Callable[[str, str], Any] = lambda *args: None
        self._refused = False
        for index, link in enumerate(self.links):
            link.bind(self, index)

    @property
    def live(self) -> bool:
        return self.channel is not None

    @property
    def bytes_received(self) -> int:
        return self._received + (self._fs.bytes_received if self._fs else 0)

    def pause(self) -> None:
        """Stop shipping (the splitters queue, then dirty-map) until ``resume``."""
        self.paused = True
        self._resumed = trio.Event()
        self._session_scope.cancel()

    def resume(self) -> None:
        self.paused = False
        self._resumed.set()

    def reopen(self) -> None:
        """End the session now, if one runs: the next one opens with ``row`` as it is."""
        self._session_scope.cancel()

    # -- ChangeSink: what the change streams deliver -----------------------------------------

    async def deliver(self, index: int, records: List[lw.Record], watermark: int,
                      whole: bool) -> None:
        channel = self.channel
        if channel is None:
            return
        try:
            if records:
                await channel.send((index, records))
            if self.channel is channel:
                self.book.forwarded(index, records)
                if whole:
                    self.book.watermark(index, watermark)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass  # the session ended; the next one rewinds

    def restarted(self, index: int) -> None:
        self.book.restarted(index)

    # -- sessions --------------------------------------------------------------------------

    async def run(self) -> None:
        backoff = 0.2
        with self.cancel_scope:
            while True:
                if self.paused:
                    self._down(ShipperState.PAUSED,
                               "paused by the administrator (ferry resume)")
                    await self._resumed.wait()
                    backoff = 0.2
                    continue
                try:
                    with trio.fail_after(self.stall_timeout):
                        stream = await self.connect(self.host, self.port, self.row.target)
                except trio.TooSlowError:
                    self._down(ShipperState.TARGET_UNREACHABLE, "cannot connect to %s: no "
                               "answer within %g s" % (self.row.target, self.stall_timeout))
                except NotPaired as e:
                    self._down(ShipperState.TARGET_UNPAIRED, str(e))
                except OSError as e:
                    self._down(ShipperState.TARGET_UNREACHABLE, "cannot connect to %s: %s"
                               % (self.row.target, e.strerror or e))
                else:
                    started = trio.current_time()
                    self._session_scope = trio.CancelScope()
                    self._fs = session_stream(stream, self.row.target)
                    try:
                        with self._session_scope:
                            await self._session(self._fs)
                        if self.paused:
                            continue  # pause() ended the session; the loop's top waits
                    except NotPaired as e:
                        self._down(ShipperState.TARGET_UNPAIRED, str(e))
                    except frames.RemoteError as e:
                        state = REMOTE_STATES.get(e.code, ShipperState.TARGET_ERROR)
                        self._down(state, "%s: %s" % (e.code, e)
                                   if state is not ShipperState.TARGET_UNPAIRED
                                   else "the target accepts only TLS from paired sites: "
                                   + how_to_pair(self.row.target))
                        if state is ShipperState.JOURNAL_FULL:
                            self._refused = True
                            self.journal_refused(self.row.name, "source", str(e))
                        if state is ShipperState.FENCED:
                            await self._fence(str(e))
                            self._split_brain()
                    except frames.ProtocolError as e:
                        self._down(ShipperState.TARGET_ERROR, "protocol error: %s" % e)
                    except LinkStalled as e:
                        self._down(ShipperState.TARGET_UNREACHABLE, str(e))
                    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                            OSError) as e:
                        self._down(ShipperState.TARGET_UNREACHABLE, "link to %s lost: %s"
                                   % (self.row.target, e or type(e).__name__))
                    finally:
                        # Forcefully: a frozen peer would never take a TLS close_notify.
                        await trio.aclose_forcefully(stream)
                        self._received += self._fs.bytes_received
                        self._fs, self.seeds = None, []
                    if trio.current_time() - started > 10:
                        backoff = 0.2  # it worked for a while: try again soon
                if self.state is ShipperState.FENCED:
                    # Asked again now and then: a rolled-back failover takes A back.
                    await trio.sleep(FENCED_RETRY)
                    continue
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _down(self, state: ShipperState, error: str) -> None:
        if (state, error) != (self.state, self.error):
            log.warning("group %s: %s", self.row.name, error)
        self.state, self.error = self.state.to(state), error
        self._link("down")
        self.channel = None
        self.connected_since = None
        for link in self.links:
            link.stop_forwarding()

    async def _session(self, fs: SessionStream) -> None:
        self.seeds = [None] * len(self.links)
        if self.row.settings.get("seeds") and self.error is None:
            self.error = "waiting for site B: it adopts the seeds of a new group first"
        try:
            with trio.fail_after(self.stall_timeout):
                durable = await open_session(fs, self.row, self.site_id, probe=False,
                                             seeds=self.seeds, held=self.held())
        except trio.TooSlowError:
            raise LinkStalled("link to %s stalled: the handshake did not complete within "
                              "%g s" % (self.row.target, self.stall_timeout)) from None
        send_ch, recv_ch = trio.open_memory_channel[Tuple[int, List[lw.Record]]](64)
        log.info("group %s: replicating to %s", self.row.name, self.row.target)
        self.state, self.error = self.state.to(ShipperState.REPLICATING), None
        self.connected_since = time.time()
        self._link("connected")
        await self._fence(None)  # the target takes the group again (a rolled-back failover)
        self._waiting_since, self._last_send, self._ping = None, trio.current_time(), False
        self.book.session_started(durable)
        self._nudged = False
        for link, d in zip(self.links, durable):
            await link.start_forwarding(d)
        self.channel = send_ch
        try:
            await race(lambda: self._send(fs, recv_ch), lambda: self._receive_acks(fs),
                       lambda: self._tick(send_ch), lambda: self._heartbeat(fs, send_ch))
        finally:
            self.channel = None
            send_ch.close()
            recv_ch.close()

    async def _send(self, fs: SessionStream, recv_ch: trio.MemoryReceiveChannel) -> None:
        while True:
            index, records = await recv_ch.receive()
            items = [(index, r) for r in records]
            size = sum(r.nbytes for r in records)
            while size < MAX_BATCH and len(items) < frames.MAX_RECORDS:
                try:
                    index, records = recv_ch.receive_nowait()
                except trio.WouldBlock:
                    break
                items.extend((index, r) for r in records)
                size += sum(r.nbytes for r in records)
            self._nudged = False
            if not items and not self.book.sendable() and not self._ping:
                continue
            # A splitter message may hold more data-less records (zeroes, trims) than a
            # frame may carry: ship them in as many frames as it takes.
            for start in range(0, max(len(items), 1), frames.MAX_RECORDS):
                await self._send_batch(fs, items[start:start + frames.MAX_RECORDS])

    async def _send_batch(self, fs: SessionStream, items: List[Tuple[int, lw.Record]]) -> None:
        """One frame: these records, and the checkpoints whose every record is now sent."""
        ready = self.book.sending(items)
        if not items and not ready and not self._ping:
            return
        self._ping = False  # this frame, empty or not, asks for an ACK
        size = sum(r.nbytes for _i, r in items)
        cps = [c.to_wire() for c in ready]

        def encode() -> Tuple[List[Tuple[int, lw.Record]], frames.Frame]:
            # Off the event loop for a large batch: only the codec's compressor is used
            # here; the session checks and counts the frame when it is sent.
            out = substitute(self.seeds, items) if any(self.seeds) else items
            msg = messages.Batch(self.row.name, out, time.time_ns(), time.monotonic_ns(),
                                 wire_checkpoints=cps)
            return out, msg.frame(fs.codec, True)

        if size > 256 * 1024:
            items, frame = await trio.to_thread.run_sync(encode)
        else:
            items, frame = encode()
        leaving = trio.current_time()
        await self.bucket.take(len(frame))  # the link's bandwidth limit, if any
        if self._waiting_since is None:
            self._waiting_since = trio.current_time()
        await fs.send_frame(frames.T_BATCH, frame)
        # How fast the link drains (limit included) picks the zstd level (compression.py).
        fs.codec.policy.sent(size, trio.current_time() - leaving)
        self._last_send = trio.current_time()
        self.bytes_sent += len(frame)
        for i, r in items:
            self.links[i].shipped(r)

    async def _receive_acks(self, fs: SessionStream) -> None:
        while True:
            ack = await fs.expect(messages.Ack)
            self._waiting_since = None  # the link moves
            if self._refused:
                self._refused = False
                self.journal_resumed(self.row.name, "source")
            if ack.repair:
                await self._repair(ack.repair)
            self.book.acked(list(ack.checkpoints))
            for link, d in zip(self.links, ack.durable):
                await link.ack(d)

    async def _tick(self, send_ch: trio.MemorySendChannel) -> None:
        """Automatic checkpoints, cuts as they resolve, and a nudge for the sender."""
        interval = float(self.settings["checkpoint_interval"])
        next_auto = trio.current_time() + interval
        while True:
            now = trio.current_time()
            if interval > 0 and now >= next_auto and not self.book.pending() and not any(
                    link.inconsistent for link in self.links):
                self.book.request("auto")
                next_auto = now + interval
            self.book.resolve()
            await self._repair_owed()
            if not self._nudged and self.book.sendable():
                self._nudged = True
                await send_ch.send((-1, []))
            await trio.sleep(CHECKPOINT_TICK)

    async def _heartbeat(self, fs: SessionStream, send_ch: trio.MemorySendChannel) -> None:
        """Ping an idle link; end a stalled one (see the module). A slow link is not a
        stalled one: while the peer's TCP stack keeps acknowledging bytes of a large frame
        (``tcp_bytes_acked``), the wait for its ACK starts again."""
        timeout = self.stall_timeout
        acked = tcp_bytes_acked(fs.stream)
        while True:
            await trio.sleep(min(1.0, timeout / 6))
            now = trio.current_time()
            waiting = self._waiting_since
            if waiting is not None and now - waiting > timeout:
                moved = tcp_bytes_acked(fs.stream)
                if moved is not None and moved != acked:
                    acked, self._waiting_since = moved, now
                    continue
                raise LinkStalled("link to %s stalled: nothing came back for %g s while "
                                  "data was owed; reconnecting" % (self.row.target, timeout))
            if waiting is None and not self._ping and now - self._last_send >= timeout / 3:
                self._ping = True
                await send_ch.send((-1, []))

    async def _repair(self, repair: Sequence[Tuple[int, int, int]]) -> None:
        """Site B asks for these ranges again (it found its copy damaged or missing)."""
        by_disk: dict = {}
        for disk, offset, length in repair:
            by_disk.setdefault(disk, []).append((offset, length))
        for disk, ranges in sorted(by_disk.items()):
            if not await self.links[disk].resync(ranges):
                log.error("group %s: site B asks for %d range(s) of disk %d again, but its "
                          "splitter is not connected; they are owed until it is", self.row.name,
                          len(ranges), disk)
                self.owed_repairs.setdefault(disk, []).extend(ranges)

    async def _repair_owed(self) -> None:
        for disk in list(self.owed_repairs):
            if await self.links[disk].resync(self.owed_repairs[disk]):
                del self.owed_repairs[disk]

    async def _fence(self, reason: Optional[str]) -> None:
        """The target holds the group failed over (``reason``): the splitters refuse writes
        from now on, so that the two sites cannot both take them; None lifts that."""
        if reason is not None and self.fenced is None:
            self.fenced_since = time.time()
            log.error("group %s FENCED: %s", self.row.name, reason)
        self.fenced = reason
        if reason is None:
            self.split_brain = None
        for link in self.links:
            await link.fence(reason)

    def held(self) -> int:
        """Bytes of writes this site holds that the target never acked."""
        return sum(link.unreplicated_bytes for link in self.links)

    def _split_brain(self) -> None:
        """The target is live and this site holds writes it never received: both sites took
        writes (reported, never resolved here: ``ferry resolve`` on site B)."""
        held = self.held()
        if held and self.split_brain is None:
            self.split_brain = {"since": iso_time(time.time_ns()), "unreplicated_bytes": held}
            log.error("group %s: SPLIT BRAIN: %s is live and this site holds %d bytes of "
                      "writes it never received; they stay on this site's disks (ferry "
                      "resolve %s --keep a|b, on %s)", self.row.name, self.row.target, held,
                      self.row.name, self.row.target)
        elif self.split_brain is not None:
            self.split_brain["unreplicated_bytes"] = max(held, self.split_brain.get(
                "unreplicated_bytes", 0))

    def fence_status(self) -> Optional[dict]:
        """``"fenced"`` in status: since when, why, and what A holds that B never received
        (writes taken before the fence landed: on A only, kept on A's disk)."""
        if self.fenced is None:
            return None
        held = sum(link.unreplicated_bytes for link in self.links)
        return {"since": iso_time(int(self.fenced_since * 1e9)), "reason": self.fenced,
                "unreplicated_bytes": held, "split_brain": self.split_brain}

    def _link(self, state: str) -> None:
        if state != self.link_state:
            self.link_state, self.link_since = state, time.time()

    def link_status(self) -> dict:
        """``"link"`` in status: connected, connecting or down, since when, and why."""
        return {"state": self.link_state, "since": iso_time(int(self.link_since * 1e9)),
                "cause": self.error if self.link_state == "down" else None}


_TCP_INFO_BYTES_ACKED = struct.Struct("<Q")  # struct tcp_info's tcpi_bytes_acked


def tcp_bytes_acked(stream: object) -> Optional[int]:
    """How many bytes the peer's TCP stack has acknowledged on this connection (Linux
    ``TCP_INFO``), or None where that cannot be read (not TCP, an older kernel)."""
    sock = getattr(getattr(stream, "transport_stream", stream), "socket", None)
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    except OSError:
        return None
    if len(info) < 128:
        return None
    return int(_TCP_INFO_BYTES_ACKED.unpack_from(info, 120)[0])
