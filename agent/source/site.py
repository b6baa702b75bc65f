"""The sending half of an agent: its splitters' records, shipped to the target site.

Theory of operation
-------------------
Each splitter connects to the agent's Unix socket and streams its disk's records in
sequence order. The splitter keeps every record until the target has acked it; the agent
keeps none. That is what lets the agent crash, restart, or lose its link at any moment:
whatever was in flight is simply sent again.

A group has one shipper and, while the target is reachable, one session (one TCP
connection). When a session opens, the target says what it holds (per disk, the newest
durable ``(gen, seq)``); the shipper then asks each splitter to REWIND (send again all it
has not had acked) and forwards each disk's records strictly in sequence from there:
duplicates are dropped, and a gap (records from before the rewind) asks for another
rewind. Records from all the group's disks go into one bounded channel, so a slow link
pushes back on the splitters, whose queues fill and spill into their dirty maps: the
VM never waits. The target's ACKs are passed on to the splitters, which free their queues.

Checkpoints: the shipper feeds a ``checkpoints.Cutter`` with what it forwards and with each
splitter batch's watermark; a ticker asks for an automatic checkpoint every
``checkpoint_interval`` seconds (and the API for a user's), collects the cuts the cutter
resolves, and attaches each checkpoint to the first BATCH sent after every record of its cut.
A checkpoint the target has not acked is sent again in the next session.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import stat
import time
import uuid
from collections import deque
from typing import Any, Awaitable, Callable, Deque, Dict, List, Optional, Set, Tuple

import trio

from formats import localwire as lw
from formats.records import KIND_SEEDED

from .. import seed, tls
from ..checkpoints import Checkpoint, Cutter, Point, Request
from ..errors import (
    Conflict,
    Forbidden,
    Invalid,
    NotFound,
    PeerRefused,
    TimedOut,
    Unavailable,
)
from ..pairing import NotPaired, how_to_pair, refused_us
from ..protocol import batch, frames
from ..protocol.stream import FrameStream, keepalive, race
from ..protocol.stream import read_exact as read_exact_from
from ..store import DiskRow, GroupRow, Store
from ..throttle import TokenBucket
from . import splitters

log = logging.getLogger("ferry.source")

PROTOCOL = 1
DEFAULT_PORT = 4005
DEFAULT_QUEUE = 256 * 1024 * 1024
MAX_BATCH = 4 * 1024 * 1024
REWIND_INTERVAL = 1.0
SUPERVISE_INTERVAL = 2.0
CHECKPOINT_TICK = 0.05
CHECKPOINTS_KEPT = 10000  # the source's list of checkpoints it made (since it started)
DEFAULT_SETTINGS: Dict[str, Any] = {
    "history_s": 4 * 3600,              # the target keeps this much history
    "journal_max": 50 * 1024 ** 3,      # and at most this many journal bytes
    "checkpoint_interval": 1.0,         # automatic checkpoints (0: none)
    "bandwidth": 0,                     # bytes/s the link may carry (0: no limit)
}
# A group shows the first of its disks' states in this order (the worst first).
GROUP_STATE_ORDER = ("error", "splitter-down", "target-unpaired", "target-unreachable",
                     "target-error",
                     "target-storage-error", "connecting", "paused", "bitmap",
                     "initial-sync", "resyncing")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
# The state a group shows when the target ends a session with this error code.
REMOTE_STATES = {frames.E_STORAGE: "target-storage-error", frames.E_TLS_REQUIRED: "target-unpaired",
                 frames.E_UNPAIRED: "target-unpaired"}
Connector = Callable[[str, int, str], Awaitable[trio.abc.Stream]]


def parse_target(text: str) -> Tuple[str, int]:
    m = re.match(r"^\[([^\]]+)\](?::(\d+))?$", text) or re.match(r"^([^:]+)(?::(\d+))?$", text)
    if not m:
        raise Invalid("target %r is not HOST:PORT" % text)
    port = int(m.group(2)) if m.group(2) else DEFAULT_PORT
    if not 0 < port < 65536:
        raise Invalid("target port %d is out of range" % port)
    return m.group(1), port


class DiskLink:
    """The agent's side of one protected disk."""

    def __init__(self, row: DiskRow) -> None:
        self.row = row
        self.stream: Optional[trio.SocketStream] = None
        self.gen = 0
        self.counters: Dict[str, Any] = {}
        self.counters_at = 0.0
        self.acked: Tuple[int, int] = (0, 0)
        self.expected: Optional[Tuple[int, int]] = None
        self.error: Optional[str] = None
        self.shipped_bytes = 0
        self.shipped_records = 0
        self.resync_skipped_bytes = 0   # resync data site B's seed already held
        self._rewind_at = 0.0
        self._send_lock = trio.Lock()
        self.sync_replies: Dict[str, Tuple[int, int]] = {}
        self.resync_start: Optional[int] = None    # resync_bytes when this resync began
        self.resync_rate: Optional[float] = None   # bytes/s, smoothed

    @property
    def connected(self) -> bool:
        return self.stream is not None

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

    async def start_forwarding(self, durable: Tuple[int, int]) -> None:
        """A session (or a splitter connection) begins: forward from what the target holds."""
        if not self.connected:
            self.expected = None
            return
        tgen, tseq = durable
        if self.gen == tgen:
            self.expected = (self.gen, tseq + 1)
            await self.send(lw.pack_ack(tgen, tseq))
        elif self.gen > tgen:
            self.expected = (self.gen, 1)
        else:
            self.expected = None
            self.error = ("splitter generation %d is older than the target's %d: the "
                          "splitter's state file was lost; unprotect and protect again"
                          % (self.gen, tgen))
            log.error("disk %s: %s", self.row.name, self.error)
            return
        self.error = None
        self._rewind_at = trio.current_time()
        await self.send(lw.pack_json(lw.MSG_REWIND, {}))

    async def filter(self, records: List[lw.Record]) -> Tuple[List[lw.Record], bool]:
        """The records to forward, strictly in sequence; asks for a rewind on a gap. The
        flag says the whole batch was taken (none left out by a gap): only then does its
        watermark hold for what was forwarded."""
        if self.expected is None:
            return [], False
        out = []
        gen, seq = self.expected
        whole = True
        for r in records:
            if r.gen != gen or r.seq < seq:
                continue
            if r.seq > seq:
                if self.counters.get("gen") == gen and self.counters.get("acked_seq", 0) >= seq:
                    # The splitter freed these records on an ack: the target has lost them.
                    self.expected = None
                    self.error = ("site B no longer holds records %d/%d.. that it acked "
                                  "(its data was lost or replaced): unprotect and protect "
                                  "the group again for a full sync" % (gen, seq))
                    log.error("disk %s: %s", self.row.name, self.error)
                    return [], False
                now = trio.current_time()
                if now - self._rewind_at > REWIND_INTERVAL:
                    self._rewind_at = now
                    await self.send(lw.pack_json(lw.MSG_REWIND, {}))
                whole = False
                break
            out.append(r)
            seq += 1
        self.expected = (gen, seq)
        return out, whole


async def plain_connect(host: str, port: int, address: str) -> trio.abc.Stream:
    """Plain TCP (an ``--insecure`` agent, unit tests); ``Trust.connect`` does TLS."""
    stream = await trio.open_tcp_stream(host, port)
    keepalive(stream)
    return stream


class GroupShipper:
    def __init__(self, row: GroupRow, site_id: str, links: List[DiskLink],
                 connect: Connector = plain_connect) -> None:
        self.row = row
        self.connect = connect
        self.site_id = site_id
        self.links = links
        self.host, self.port = parse_target(row.target)
        self.state = "connecting"
        self.error: Optional[str] = None
        self.channel: Optional[trio.MemorySendChannel] = None
        self.cancel_scope = trio.CancelScope()
        self.bytes_sent = 0
        self._received = 0  # by sessions that ended
        self._fs: Optional[FrameStream] = None
        self.seeds: List[Optional[seed.SeedList]] = []  # site B's, for this session
        self.connected_since: Optional[float] = None
        self.settings = dict(DEFAULT_SETTINGS, **row.settings)
        self.bucket = TokenBucket(float(self.settings["bandwidth"]))
        self.paused = bool(self.settings.get("paused"))
        self._resumed = trio.Event()
        self._session_scope = trio.CancelScope()
        self.cutter = Cutter(len(links))
        self.made: Deque[Dict[str, Any]] = deque(maxlen=CHECKPOINTS_KEPT)
        self.unacked: Dict[str, Checkpoint] = {}   # cut, not yet acked, oldest first
        self.waiters: Dict[str, trio.Event] = {}
        self.results: Dict[str, str] = {}
        self._last_cut: Optional[List[Point]] = None
        self._sent_upto: List[Point] = []
        self._sent_ids: Set[str] = set()
        self._nudged = False

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

    async def run(self) -> None:
        backoff = 0.2
        with self.cancel_scope:
            while True:
                if self.paused:
                    self._down("paused", "paused by the administrator (ferry resume)")
                    await self._resumed.wait()
                    backoff = 0.2
                    continue
                try:
                    stream = await self.connect(self.host, self.port, self.row.target)
                except NotPaired as e:
                    self._down("target-unpaired", str(e))
                except OSError as e:
                    self._down("target-unreachable", "cannot connect to %s: %s"
                               % (self.row.target, e.strerror or e))
                else:
                    started = trio.current_time()
                    self._session_scope = trio.CancelScope()
                    self._fs = FrameStream(stream, self.row.target)
                    try:
                        with self._session_scope:
                            await self._session(self._fs)
                        if self.paused:
                            continue  # pause() ended the session; the loop's top waits
                    except NotPaired as e:
                        self._down("target-unpaired", str(e))
                    except frames.RemoteError as e:
                        state = REMOTE_STATES.get(e.code, "target-error")
                        self._down(state, "%s: %s" % (e.code, e) if state != "target-unpaired"
                                   else "the target accepts only TLS from paired sites: "
                                   + how_to_pair(self.row.target))
                    except frames.ProtocolError as e:
                        self._down("target-error", "protocol error: %s" % e)
                    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                            OSError) as e:
                        self._down("target-unreachable", "link to %s lost: %s"
                                   % (self.row.target, e or type(e).__name__))
                    finally:
                        await stream.aclose()
                        self._received += self._fs.bytes_received
                        self._fs, self.seeds = None, []
                    if trio.current_time() - started > 10:
                        backoff = 0.2  # it worked for a while: try again soon
                await trio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)

    def _down(self, state: str, error: str) -> None:
        if (state, error) != (self.state, self.error):
            log.warning("group %s: %s", self.row.name, error)
        self.state, self.error = state, error
        self.channel = None
        self.connected_since = None
        for link in self.links:
            link.expected = None

    async def _session(self, fs: FrameStream) -> None:
        self.seeds = [None] * len(self.links)
        if self.row.settings.get("seeds") and self.error is None:
            self.error = "waiting for site B: it adopts the seeds of a new group first"
        durable = await open_session(fs, self.row, self.site_id, probe=False,
                                     seeds=self.seeds)
        send_ch, recv_ch = trio.open_memory_channel[Tuple[int, List[lw.Record]]](64)
        log.info("group %s: replicating to %s", self.row.name, self.row.target)
        self.state, self.error = "replicating", None
        self.connected_since = time.time()
        for req in self.cutter.reset(durable):
            self._finished(req)
        self._sent_upto = list(durable)
        self._sent_ids = set()
        self._nudged = False
        for link, d in zip(self.links, durable):
            link.acked = max(link.acked, d) if link.gen == d[0] else d
            await link.start_forwarding(d)
        self.channel = send_ch
        try:
            await race(lambda: self._send(fs, recv_ch), lambda: self._receive_acks(fs),
                       lambda: self._tick(send_ch))
        finally:
            self.channel = None
            send_ch.close()
            recv_ch.close()

    async def _send(self, fs: FrameStream, recv_ch: trio.MemoryReceiveChannel) -> None:
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
            if not items and not self._sendable():
                continue
            # A splitter message may hold more data-less records (zeroes, trims) than a
            # frame may carry: ship them in as many frames as it takes.
            for start in range(0, max(len(items), 1), frames.MAX_RECORDS):
                await self._send_batch(fs, items[start:start + frames.MAX_RECORDS])

    async def _send_batch(self, fs: FrameStream, items: List[Tuple[int, lw.Record]]) -> None:
        """One frame: these records, and the checkpoints whose every record is now sent."""
        for i, r in items:
            self._sent_upto[i] = (r.gen, r.seq)
        ready = self._sendable()
        if not items and not ready:
            return
        size = sum(r.nbytes for _i, r in items)
        cps = [c.to_wire() for c in ready]
        self._sent_ids.update(c.id for c in ready)

        def encode() -> Tuple[List[Tuple[int, lw.Record]], bytes]:
            out = seed.substitute(self.seeds, items) if any(self.seeds) else items
            body = batch.encode_batch(self.row.name, out, time.time_ns(), time.monotonic_ns(),
                                     cps)
            return out, fs.codec.encode(frames.T_BATCH, body, True)

        if size > 256 * 1024:
            items, frame = await trio.to_thread.run_sync(encode)
        else:
            items, frame = encode()
        await self.bucket.take(len(frame))  # the link's bandwidth limit, if any
        await fs.send_frame(frame)
        self.bytes_sent += len(frame)
        for i, r in items:
            if r.kind == KIND_SEEDED:
                self.links[i].resync_skipped_bytes += r.length
            elif r.data is not None:
                self.links[i].shipped_bytes += r.length
            self.links[i].shipped_records += 1

    # -- checkpoints ---------------------------------------------------------------------

    def _sendable(self) -> List[Checkpoint]:
        """Cut checkpoints not sent in this session whose every record has been sent."""
        return [c for c in self.unacked.values() if c.id not in self._sent_ids
                and all(s >= cut for s, cut in zip(self._sent_upto, c.cut))]

    def request_checkpoint(self, kind: str, tag: Optional[str] = None) -> Request:
        c = Checkpoint(uuid.uuid4().hex[:12], time.monotonic_ns(), kind, tag)
        if kind == "user":
            self.waiters[c.id] = trio.Event()
        return self.cutter.request(c)

    async def _tick(self, send_ch: trio.MemorySendChannel) -> None:
        """Automatic checkpoints, cuts as they resolve, and a nudge for the sender."""
        interval = float(self.settings["checkpoint_interval"])
        next_auto = trio.current_time() + interval
        while True:
            now = trio.current_time()
            if interval > 0 and now >= next_auto and not self.cutter.pending() and not any(
                    link.counters.get("inconsistent") for link in self.links):
                self.request_checkpoint("auto")
                next_auto = now + interval
            for req in self.cutter.resolve():
                self._finished(req)
            if not self._nudged and self._sendable():
                self._nudged = True
                await send_ch.send((-1, []))
            await trio.sleep(CHECKPOINT_TICK)

    def _finished(self, req: Request) -> None:
        c = req.checkpoint
        if req.result != "ok":
            if c.kind == "user":
                log.warning("group %s: checkpoint %s impossible: %s", self.row.name, c.id,
                            req.result)
                self.results[c.id] = str(req.result)
                self._wake(c.id)
            return
        if c.kind == "auto" and c.cut == self._last_cut:
            return  # nothing changed since the last checkpoint
        self._last_cut = list(c.cut)
        c.wall_ns = time.time_ns() - (time.monotonic_ns() - c.time_ns)
        self.unacked[c.id] = c
        self.made.append(dict(c.to_json(), acked=False))

    def _wake(self, cid: str) -> None:
        event = self.waiters.pop(cid, None)
        if event is not None:
            event.set()

    def _acked_checkpoints(self, ids: List[str]) -> None:
        for cid in ids:
            if self.unacked.pop(cid, None) is None:
                continue
            for entry in reversed(self.made):
                if entry["id"] == cid:
                    entry["acked"] = True
                    break
            self.results[cid] = "ok"
            self._wake(cid)

    async def _receive_acks(self, fs: FrameStream) -> None:
        while True:
            body = await fs.expect(frames.T_ACK)
            ids = body.get("checkpoints", [])
            if isinstance(ids, list):
                self._acked_checkpoints([i for i in ids if isinstance(i, str)])
            durable = parse_durable(body, len(self.links))
            for link, d in zip(self.links, durable):
                if d > link.acked:
                    link.acked = d
                    if d[0] == link.gen:
                        await link.send(lw.pack_ack(*d))


def parse_durable(body: dict, ndisks: int) -> List[Tuple[int, int]]:
    raw = frames.field(body, "durable", list)
    if len(raw) != ndisks:
        raise frames.ProtocolError("durable list of %d disks for a group of %d"
                                 % (len(raw), ndisks))
    out = []
    for d in raw:
        if not (isinstance(d, list) and len(d) == 2 and all(isinstance(x, int) for x in d)):
            raise frames.ProtocolError("bad durable entry %r" % (d,))
        out.append((d[0], d[1]))
    return out


async def open_session(fs: FrameStream, row: GroupRow, site_id: str, probe: bool,
                       seeds: Optional[List[Optional[seed.SeedList]]] = None
                       ) -> List[Tuple[int, int]]:
    """HELLO, OPEN; the target's durable points, and its SEED frames into ``seeds``."""
    try:
        # Under TLS 1.3 the target checks our certificate after our side of the handshake
        # is done: its refusal shows up on the first send or the first read, whichever
        # meets the closed session first.
        await fs.send(frames.T_HELLO, {"protocol": PROTOCOL, "site": site_id})
        await fs.expect(frames.T_WELCOME)
    except (EOFError, trio.BrokenResourceError):
        if isinstance(fs.stream, tls.TLSSocketStream):
            raise refused_us(row.target) from None  # it did not take our certificate
        raise
    settings = dict(DEFAULT_SETTINGS, **row.settings)
    body = {"group": row.name, "protection": row.protection, "probe": probe,
            "disks": [{"name": d.name, "size": d.size} for d in row.disks],
            "history_s": int(settings["history_s"]),
            "journal_max": int(settings["journal_max"])}
    if settings.get("seeds"):
        body["seeds"] = settings["seeds"]  # pre-seeded sync: site B's files (agent/seed.py)
    await fs.send(frames.T_OPEN, body)
    opened = await fs.expect(frames.T_OPENED)
    durable = parse_durable(opened, len(row.disks))
    nseed = opened.get("seed_frames", 0)
    if seeds is not None and isinstance(nseed, int):
        for _ in range(nseed):
            seed.parse_frame(await fs.expect(frames.T_SEED), seeds, [d.size for d in row.disks])
    return durable


class SourceSite:
    def __init__(self, data_dir: str, store: Store, connect: Connector = plain_connect
                 ) -> None:
        self.data_dir = data_dir
        self.store = store
        self.connect = connect
        self.site_id = store.site_id()
        self.socket_path = os.path.join(data_dir, "splitter.sock")
        self.links: Dict[str, DiskLink] = {}
        self.shippers: Dict[str, GroupShipper] = {}
        self._nursery: Optional[trio.Nursery] = None
        self._busy: set = set()

    # -- serving -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve splitters and ship every protected group until cancelled."""
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        await sock.bind(self.socket_path)
        sock.listen(64)
        listener = trio.SocketListener(sock)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for row in self.store.groups():
                self._start_group(row)
                await trio.to_thread.run_sync(self._ensure_splitters, row)
            task_status.started()
            nursery.start_soon(self._supervise)
            await trio.serve_listeners(self._splitter_conn, [listener])

    async def _supervise(self) -> None:
        """Restart a splitter that died (qemu's NBD client reconnects to the new one)."""
        while True:
            await trio.sleep(SUPERVISE_INTERVAL)
            for name in list(self.shippers):
                row = self.store.group(name)
                if row is None or name in self._busy:
                    continue
                dead = [d for d in row.disks if splitters.running_pid(
                    splitters.SplitterPaths.for_disk(self.data_dir, d.id), d.id) is None]
                if dead:
                    log.warning("group %s: splitter for %s is not running; restarting it",
                                name, ", ".join(d.name for d in dead))
                    await trio.to_thread.run_sync(self._ensure_splitters, row)

    def _start_group(self, row: GroupRow) -> None:
        links = [DiskLink(d) for d in row.disks]
        for link in links:
            self.links[link.row.id] = link
        shipper = GroupShipper(row, self.site_id, links, self.connect)
        self.shippers[row.name] = shipper
        assert self._nursery is not None
        self._nursery.start_soon(shipper.run)

    def _stop_group(self, row: GroupRow) -> None:
        shipper = self.shippers.pop(row.name, None)
        if shipper is not None:
            shipper.cancel_scope.cancel()
        for d in row.disks:
            self.links.pop(d.id, None)

    def _ensure_splitters(self, row: GroupRow) -> None:
        for d in row.disks:
            paths = splitters.SplitterPaths.for_disk(self.data_dir, d.id)
            try:
                splitters.start(paths, d.id, d.path, self.socket_path, row.name, d.name,
                                row.queue_bytes)
            except (splitters.SplitterError, OSError) as e:
                log.error("group %s disk %s: splitter not running: %s", row.name, d.name, e)

    async def _splitter_conn(self, stream: trio.SocketStream) -> None:
        link: Optional[DiskLink] = None

        async def read_exact(n: int) -> bytes:
            return await read_exact_from(stream, n, "splitter")

        try:
            msg_type, length = lw.unpack_header(await read_exact(lw.HEADER.size))
            if msg_type != lw.MSG_HELLO:
                raise lw.ProtocolError("splitter did not start with HELLO")
            hello = lw.unpack_json(await read_exact(length))
            link = self.links.get(str(hello.get("disk_id")))
            if link is None:
                log.warning("a splitter for unknown disk %r connected; closing it",
                            hello.get("disk_id"))
                return
            if link.stream is not None:
                await link.stream.aclose()
            link.stream = stream
            old_gen, link.gen = link.gen, int(hello.get("gen", 0))
            shipper = self.shippers[link.row.group]
            if old_gen and link.gen != old_gen:
                for req in shipper.cutter.restarted(link.row.index):
                    shipper._finished(req)
            log.info("splitter for %s/%s connected (generation %d)",
                     link.row.group, link.row.name, link.gen)
            shipper = self.shippers[link.row.group]
            if shipper.live:
                await link.start_forwarding(link.acked)
            while True:
                msg_type, length = lw.unpack_header(await read_exact(lw.HEADER.size))
                payload = await read_exact(length)
                if msg_type == lw.MSG_RECORDS:
                    watermark, records = lw.unpack_records(payload)
                    records, whole = await link.filter(records)
                    channel = shipper.channel
                    if channel is not None:
                        try:
                            if records:
                                await channel.send((link.row.index, records))
                            if shipper.channel is channel:
                                shipper.cutter.forwarded(link.row.index, records)
                                if whole:
                                    shipper.cutter.watermark(link.row.index, watermark)
                        except (trio.BrokenResourceError, trio.ClosedResourceError):
                            pass  # the session ended; the next one rewinds
                elif msg_type == lw.MSG_STATE:
                    link.update_counters(lw.unpack_json(payload), time.time())
                elif msg_type == lw.MSG_SYNC_REPLY:
                    reply = lw.unpack_json(payload)
                    link.sync_replies[str(reply["token"])] = (int(reply["gen"]),
                                                              int(reply["seq"]))
                else:
                    raise lw.ProtocolError("unexpected message type %d" % msg_type)
        except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
                ConnectionError) as e:
            if link is not None:
                log.info("splitter for %s/%s disconnected: %s", link.row.group, link.row.name, e)
        except (lw.ProtocolError, KeyError, ValueError) as e:
            log.error("dropping splitter connection: %s", e)
        finally:
            if link is not None and link.stream is stream:
                link.stream = None
                link.expected = None
            await stream.aclose()

    # -- requests ------------------------------------------------------------------------

    async def protect(self, name: str, disks: List[Tuple[str, str]], target: str,
                      queue_bytes: int = DEFAULT_QUEUE,
                      allow_unreachable: bool = False,
                      settings: Optional[Dict[str, Any]] = None,
                      seeds: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """``seeds``: {disk name: a file on site B to start its replica from}."""
        if not NAME_RE.match(name):
            raise Invalid("group name %r: use letters, digits, '_', '.', '-'" % name)
        if name in self._busy or self.store.group(name) is not None:
            raise Conflict("group %s already exists" % name)
        parse_target(target)
        if not disks:
            raise Invalid("a group needs at least one --disk")
        rows = []
        seen = set()
        for dname, path in disks:
            if not NAME_RE.match(dname):
                raise Invalid("disk name %r: use letters, digits, '_', '.', '-'" % dname)
            if dname in seen:
                raise Invalid("disk name %s is given twice" % dname)
            seen.add(dname)
            path, size = await trio.to_thread.run_sync(_disk_size, dname, path)
            other = self.store.disk_by_path(path)
            if other is not None:
                raise Conflict("disk %s is already protected (group %s, disk %s)"
                                   % (path, other.group, other.name))
            if size == 0:
                raise Invalid("disk %s: %s is empty" % (dname, path))
            rows.append((dname, path, size))
        for dname, path in (seeds or {}).items():
            if dname not in seen:
                raise Invalid("a seed for disk %s, which group %s does not have"
                                   % (dname, name))
            if not path.startswith("/"):
                raise Invalid("seed %s for disk %s: give the absolute path of a file on "
                                   "site B" % (path, dname))
        if seeds:
            settings = dict(settings or {}, seeds=dict(seeds))
        self._busy.add(name)
        try:
            row = GroupRow(name, target, uuid.uuid4().hex, queue_bytes, time.time(),
                           [DiskRow("", name, i, d, p, s) for i, (d, p, s) in enumerate(rows)],
                           dict(settings or {}))
            await self._probe_target(row, allow_unreachable)
            row = self.store.add_group(name, target, queue_bytes, rows,
                                      protection=row.protection, settings=row.settings)
            self._start_group(row)  # ready for the splitters before they start
            try:
                await trio.to_thread.run_sync(self._start_splitters_or_fail, row)
            except BaseException:
                self._stop_group(row)
                self.store.remove_group(name)
                raise
        finally:
            self._busy.discard(name)
        log.info("protected group %s: %s -> %s", name,
                 ", ".join("%s=%s" % (d.name, d.path) for d in row.disks), target)
        return self._group_info(row)

    async def _probe_target(self, row: GroupRow, allow_unreachable: bool) -> None:
        host, port = parse_target(row.target)
        try:
            with trio.fail_after(10):
                stream = await self.connect(host, port, row.target)
                fs = FrameStream(stream, row.target)
                try:
                    await open_session(fs, row, self.site_id, probe=True)
                finally:
                    await fs.aclose()
        except NotPaired as e:
            raise Forbidden(str(e)) from None
        except frames.RemoteError as e:
            if e.code in (frames.E_TLS_REQUIRED, frames.E_UNPAIRED):
                raise Forbidden("target %s accepts only TLS from paired sites and this "
                                "agent runs --insecure: start it without --insecure, then "
                                "%s" % (row.target, how_to_pair(row.target))) from None
            raise PeerRefused("target %s refused the group: %s" % (row.target, e)) from None
        except (OSError, EOFError, trio.TooSlowError, frames.ProtocolError,
                trio.BrokenResourceError) as e:
            if allow_unreachable:
                log.warning("group %s: target %s unreachable (%s); protecting anyway",
                            row.name, row.target, e)
                return
            raise Unavailable("target %s unreachable: %s (start its agent, or pass "
                              "--allow-unreachable)" % (row.target, e or type(e).__name__)
                              ) from None

    def _start_splitters_or_fail(self, row: GroupRow) -> None:
        started = []
        try:
            for d in row.disks:
                paths = splitters.SplitterPaths.for_disk(self.data_dir, d.id)
                splitters.start(paths, d.id, d.path, self.socket_path, row.name, d.name,
                                row.queue_bytes)
                started.append((paths, d))
        except (splitters.SplitterError, OSError) as e:
            for paths, d in started:
                splitters.stop(paths, d.id)
                _remove_files(paths)
            raise Unavailable("cannot start the splitter: %s" % e) from None

    async def unprotect(self, name: str) -> Dict[str, Any]:
        row = self.store.group(name)
        if row is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        self._busy.add(name)  # the supervisor leaves it alone from now on
        self._stop_group(row)

        def stop_all() -> None:
            for d in row.disks:
                paths = splitters.SplitterPaths.for_disk(self.data_dir, d.id)
                splitters.stop(paths, d.id)
                _remove_files(paths)

        try:
            await trio.to_thread.run_sync(stop_all)
            self.store.remove_group(name)
        finally:
            self._busy.discard(name)
        log.info("unprotected group %s", name)
        return {"group": name, "disks": [d.name for d in row.disks]}

    async def wait_synced(self, name: str, seconds: float) -> Dict[str, Any]:
        """Return once the target holds every write made before the call."""
        row = self.store.group(name)
        if row is None:
            raise NotFound("no group %s on this site" % name)
        links = [self.links[d.id] for d in row.disks]
        token = uuid.uuid4().hex
        points: Dict[str, Tuple[int, int]] = {}
        asked: Dict[str, Any] = {}
        with trio.move_on_after(seconds):
            while True:
                for link in links:
                    if link.row.id in points:
                        continue
                    reply = link.sync_replies.pop(token, None)
                    if reply is not None:
                        points[link.row.id] = reply
                    elif link.connected and asked.get(link.row.id) is not link.stream:
                        asked[link.row.id] = link.stream
                        await link.send(lw.pack_json(lw.MSG_SYNC_REQ, {"token": token}))
                if len(points) == len(links) and all(
                        _covers(link, points[link.row.id]) for link in links):
                    return {"group": name, "synced": True,
                            "disks": {link.row.name: list(points[link.row.id])
                                      for link in links}}
                await trio.sleep(0.02)
        behind = []
        for link in links:
            if link.row.id not in points:
                behind.append("%s: %s" % (link.row.name, "splitter not connected"
                                          if not link.connected else "resync still running"))
            elif link.acked < points[link.row.id]:
                behind.append("%s: target acked %d/%d of %d/%d" % (
                    (link.row.name,) + link.acked + points[link.row.id]))
        raise TimedOut("group %s not synced after %g s (%s)"
                           % (name, seconds, "; ".join(behind)))

    async def checkpoint(self, name: str, tag: Optional[str], seconds: float
                         ) -> Dict[str, Any]:
        """Cut a user checkpoint and wait until the target has journaled it."""
        shipper = self.shippers.get(name)
        if shipper is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        if tag is not None and (not tag or len(tag) > 256 or "\n" in tag):
            raise Invalid("a tag is 1 to 256 characters on one line")
        if not shipper.live:
            raise Conflict("group %s is not replicating (%s): no checkpoint can be cut "
                               "now" % (name, shipper.state))
        bad = [link.row.name for link in shipper.links if link.counters.get("inconsistent")]
        if bad:
            raise Conflict("group %s: disk %s is being resynced; a crash-consistent "
                               "checkpoint is possible once it ends" % (name, bad[0]))
        req = shipper.request_checkpoint("user", tag)
        cid = req.checkpoint.id
        event = shipper.waiters[cid]
        with trio.move_on_after(seconds):
            await event.wait()
        result = shipper.results.pop(cid, None)
        if result is None:
            if cid in shipper.unacked:
                return {"group": name, "id": cid, "tag": tag, "acked": False}
            raise TimedOut("group %s: checkpoint not cut within %g s (a splitter is not "
                               "connected or the link is down)" % (name, seconds))
        if result != "ok":
            raise Conflict("group %s: no crash-consistent checkpoint: %s"
                               % (name, result))
        return {"group": name, "id": cid, "tag": tag, "acked": True,
                "wall_ns": req.checkpoint.wall_ns, "cut": [list(c) for c in req.checkpoint.cut]}

    def set_paused(self, name: str, paused: bool) -> Dict[str, Any]:
        """Pause or resume shipping a group; kept across an agent restart."""
        row = self.store.group(name)
        shipper = self.shippers.get(name)
        if row is None or shipper is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        self.store.set_settings(name, dict(row.settings, paused=paused))
        if paused and not shipper.paused:
            shipper.pause()
            log.info("group %s: paused", name)
        elif not paused and shipper.paused:
            shipper.resume()
            log.info("group %s: resumed", name)
        return {"group": name, "paused": paused}

    def set_bandwidth(self, name: str, bytes_per_second: int) -> Dict[str, Any]:
        """Change a group's bandwidth limit now, and for the agent's next start."""
        row = self.store.group(name)
        shipper = self.shippers.get(name)
        if row is None or shipper is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        if bytes_per_second < 0:
            raise Invalid("a bandwidth limit cannot be negative")
        settings = dict(row.settings, bandwidth=int(bytes_per_second))
        self.store.set_settings(name, settings)
        shipper.settings["bandwidth"] = int(bytes_per_second)
        shipper.bucket.set_rate(bytes_per_second)
        log.info("group %s: bandwidth limit %s", name,
                 "%d bytes/s" % bytes_per_second if bytes_per_second else "off")
        return {"group": name, "bandwidth": int(bytes_per_second)}

    def checkpoints(self, name: str) -> List[Dict[str, Any]]:
        shipper = self.shippers.get(name)
        if shipper is None:
            raise NotFound("no group %s on this site" % name)
        return list(shipper.made)

    # -- status --------------------------------------------------------------------------

    def _group_info(self, row: GroupRow) -> Dict[str, Any]:
        return {"group": row.name, "target": row.target,
                "disks": [{"name": d.name, "path": d.path, "size": d.size,
                           "nbd_uri": splitters.SplitterPaths.for_disk(self.data_dir,
                                                                       d.id).nbd_uri}
                          for d in row.disks]}

    def status(self) -> Dict[str, Any]:
        out = {}
        now = time.time()
        for row in self.store.groups():
            shipper = self.shippers.get(row.name)
            disks = {}
            for d in row.disks:
                link = self.links.get(d.id)
                if link is None:
                    continue
                disks[d.name] = self._disk_status(row, d, link, shipper, now)
            states = {v["state"] for v in disks.values()}
            group_state = next((s for s in GROUP_STATE_ORDER if s in states), "replicating")
            out[row.name] = {
                "role": "source",
                "state": group_state,
                "target": row.target,
                "error": shipper.error if shipper else None,
                "rpo_seconds": max((v["rpo_seconds"] for v in disks.values()), default=0.0),
                "bytes_sent": shipper.bytes_sent if shipper else 0,
                "bytes_received": shipper.bytes_received if shipper else 0,
                "settings": dict(DEFAULT_SETTINGS, **row.settings),
                "checkpoints_made": len(shipper.made) if shipper else 0,
                "checkpoints_unacked": len(shipper.unacked) if shipper else 0,
                "last_checkpoint": shipper.made[-1] if shipper and shipper.made else None,
                "disks": disks,
            }
        return out

    def _disk_status(self, row: GroupRow, d: DiskRow, link: DiskLink,
                     shipper: Optional[GroupShipper], now: float) -> Dict[str, Any]:
        paths = splitters.SplitterPaths.for_disk(self.data_dir, d.id)
        c = link.counters if link.connected else {}
        stale = now - link.counters_at if link.counters_at else 0.0
        backlog = bool(c.get("queued_records") or c.get("inconsistent"))
        rpo = c.get("lag_ns", 0) / 1e9 + (stale if backlog else 0.0)
        if not link.connected and link.counters_at:
            # Nothing is known since the splitter went away: count from then.
            rpo = link.counters.get("lag_ns", 0) / 1e9 + stale
        if link.error:
            state = "error"
        elif not link.connected:
            state = "splitter-down"
        elif shipper is None or not shipper.live:
            state = shipper.state if shipper else "paused"
            if c.get("inconsistent") and state != "paused":
                state = "bitmap"
        elif c.get("inconsistent"):
            state = "initial-sync" if c.get("initial") else "resyncing"
        else:
            state = "replicating"
        return {
            "state": state,
            "error": link.error,
            "path": d.path,
            "size": d.size,
            "nbd_uri": paths.nbd_uri,
            "generation": link.gen,
            "bytes_written": c.get("written_bytes", 0),
            "bytes_shipped": link.shipped_bytes,
            "resync_skipped_bytes": link.resync_skipped_bytes,
            "records_shipped": link.shipped_records,
            "bytes_queued": c.get("queued_bytes", 0),
            "records_queued": c.get("queued_records", 0),
            "queue_limit": c.get("queue_limit", row.queue_bytes),
            "dirty_bytes": c.get("dirty_bytes", 0),
            "dirty_ranges": c.get("dirty_ranges", 0),
            "dirty_coarsened_bytes": c.get("dirty_coarsened_bytes", 0),
            "dirty_granularity": c.get("dirty_granularity", 0),
            "resync_bytes": c.get("resync_bytes", 0),
            "last_acked_seq": link.acked[1],
            "last_acked_gen": link.acked[0],
            "next_seq": c.get("next_seq", 0),
            "rpo_seconds": round(rpo, 3),
            **link.resync_progress(),
        }


def _covers(link: DiskLink, point: Tuple[int, int]) -> bool:
    """Has the target acked, and the splitter heard it, everything up to ``point``?
    Sequence 0 is a generation with nothing written yet: nothing to wait for."""
    gen, seq = point
    if seq == 0:
        return True
    return link.acked >= point and link.counters.get("gen") == gen \
        and link.counters.get("acked_seq", 0) >= seq


def _disk_size(name: str, path: str) -> Tuple[str, int]:
    """The disk's real path and size, or a RequestError that says what is wrong."""
    path = os.path.realpath(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("disk %s: %s does not exist" % (name, path)) from None
    except OSError as e:
        raise Invalid("disk %s: %s: %s" % (name, path, e.strerror or e)) from None
    try:
        st = os.fstat(fd)
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
            raise Invalid("disk %s: %s is neither a file nor a block device" % (name, path))
        return path, os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def _remove_files(paths: splitters.SplitterPaths) -> None:
    for p in (paths.state, paths.socket, paths.pidfile):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass
