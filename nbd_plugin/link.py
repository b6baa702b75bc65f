"""The splitter's link to its host agent: one thread that keeps a Unix socket connected and
moves the change log onto it, and one reader thread per connection for the agent's replies.

Nothing here is on the VM's I/O path: when the agent is gone or slow, these threads wait or
retry, the change log fills, and the writers spill into the dirty map. Resync reads (dirty
ranges read back from the disk) are done here, only while an agent is connected.
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from formats import localwire as lw
from formats.durable import open_append

from .backends import Disk
from .changelog import ChangeLog

MAX_BATCH = 4 * 1024 * 1024
RESYNC_CHUNK = 1024 * 1024
STATE_INTERVAL = 0.5       # counters go to the agent this often,
STATE_MIN_INTERVAL = 0.02  # and this soon after an ack changed them
RETRY_INTERVAL = 0.5
ACTIVITY_TRIM_INTERVAL = 1.0  # look for idle extents to drop from the activity log,
ACTIVITY_IDLE = 5.0           # cold and not written for this long
WATERMARK_INTERVAL = 0.05  # an idle disk still tells the agent how far it is complete
BATCH_LINGER = 0.001       # after a small batch, let records gather this long
SMALL_BATCH = 256 * 1024   # bytes


_log_file = sys.stderr


def set_log_file(path: str) -> None:
    """Send the splitter's messages to ``path`` (appended), not to nbdkit's stderr."""
    global _log_file
    _log_file = os.fdopen(open_append(path), "a", buffering=1)


def log(msg: str) -> None:
    _log_file.write("%s ferry-splitter[%d]: %s\n" % (time.strftime("%F %T"), os.getpid(), msg))
    _log_file.flush()


def recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    while view:
        got = sock.recv_into(view)
        if got == 0:
            raise ConnectionError("agent closed the connection")
        view = view[got:]
    return bytes(buf)


IOV_MAX = 1024  # buffers one sendmsg takes (Linux's UIO_MAXIOV)


def send_parts(sock: socket.socket, parts: List[bytes]) -> None:
    """Send ``parts`` back to back, like ``sendall(b"".join(parts))`` but without the join:
    the kernel gathers the buffers (``sendmsg``), so a batch's data is copied once, into
    the socket, not first into a joined buffer as large as the batch."""
    bufs = [memoryview(p) for p in parts if len(p)]
    i = 0
    while i < len(bufs):
        sent = sock.sendmsg(bufs[i:i + IOV_MAX])
        while sent:
            n = len(bufs[i])
            if sent < n:
                bufs[i] = bufs[i][sent:]
                break
            sent -= n
            i += 1


class Link:
    def __init__(self, log_: ChangeLog, disk: Disk, socket_path: str,
                 hello: Dict[str, Any]) -> None:
        self.changelog = log_
        self.disk = disk
        self.socket_path = socket_path
        self.hello = hello
        self.on_carry_done: Optional[Callable[[], None]] = None
        self.connected = False
        self.state_due = False
        self._stop = threading.Event()
        self._sock: Optional[socket.socket] = None
        self._thread: Optional[threading.Thread] = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="ferry-link", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self.changelog.close()
        sock = self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _run(self) -> None:
        last_error = None
        while not self._stop.is_set():
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(self.socket_path)
            except OSError as e:
                sock.close()
                if str(e) != last_error:
                    log("agent not reachable at %s (%s); retrying" % (self.socket_path, e))
                    last_error = str(e)
                self._stop.wait(RETRY_INTERVAL)
                continue
            last_error = None
            self._sock = sock
            try:
                self._serve(sock)
            except (OSError, lw.ProtocolError) as e:
                if not self._stop.is_set():
                    log("link to agent lost: %s" % e)
            except Exception as e:  # a bug here must not end replication for good
                log("link thread error, reconnecting: %s: %s" % (type(e).__name__, e))
            finally:
                self.connected = False
                self._sock = None
                sock.close()
            self._stop.wait(RETRY_INTERVAL)

    def _serve(self, sock: socket.socket) -> None:
        sock.sendall(lw.pack_json(lw.MSG_HELLO, self.hello))
        self.changelog.rewind()
        reader_error: list = []
        reader = threading.Thread(target=self._read, args=(sock, reader_error),
                                  name="ferry-link-reader", daemon=True)
        reader.start()
        self.connected = True
        log("connected to agent")
        next_state = next_trim = 0.0
        resynced = False  # the last resync step did work: look for more without waiting
        last_watermark = 0.0
        try:
            while not self._stop.is_set() and reader.is_alive():
                if self.changelog.carried_done and self.on_carry_done is not None:
                    self.changelog.carried_done = False
                    self.on_carry_done()
                replies = self.changelog.sync_replies()
                now = time.monotonic()
                if now >= next_trim:
                    self.changelog.trim_activity(now, ACTIVITY_IDLE)
                    next_trim = now + ACTIVITY_TRIM_INTERVAL
                if replies or now >= next_state or (self.state_due and now >= next_state
                                                    - STATE_INTERVAL + STATE_MIN_INTERVAL):
                    # State first: the agent sees the counters a reply is based on.
                    self.state_due = False
                    sock.sendall(lw.pack_json(lw.MSG_STATE, self.changelog.counters()))
                    next_state = now + STATE_INTERVAL
                for token, seq in replies:
                    sock.sendall(lw.pack_json(lw.MSG_SYNC_REPLY,
                                              {"token": token, "gen": self.changelog.gen,
                                               "seq": seq}))
                if resynced and self.changelog.unsent_bytes() < MAX_BATCH:
                    # Read a batch's worth of dirty data before sending: one frame and one
                    # journal sync on site B per batch, not per piece.
                    resynced = self._resync_step()
                    if resynced:
                        continue
                records, watermark = self.changelog.take(MAX_BATCH,
                                                         timeout=0.0 if resynced else 0.1)
                if records:
                    parts = lw.pack_records(records, watermark)
                    send_parts(sock, parts)
                    resynced = False
                    last_watermark = now
                    if lw.unpack_header(parts[0])[1] < SMALL_BATCH:
                        # Few records came: let more gather (fewer wake-ups here and in
                        # the writers, fewer messages for the agent) for a millisecond
                        # of replication lag.
                        time.sleep(BATCH_LINGER)
                else:
                    if now - last_watermark >= WATERMARK_INTERVAL:
                        # Nothing to send: the watermark alone lets group checkpoints
                        # cut past an idle disk.
                        send_parts(sock, lw.pack_records([], watermark))
                        last_watermark = now
                    resynced = self._resync_step()
        finally:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            reader.join(timeout=10)
        if reader_error:
            raise reader_error[0]

    def _resync_step(self) -> bool:
        """Read one dirty piece back into the queue; False when there was nothing to do
        (no dirty range, or no room in the queue yet)."""
        # Small queues resync in small pieces, so a piece always fits once the queue drains.
        chunk = max(4096, min(RESYNC_CHUNK, self.changelog.queue_limit // 4))
        taken = self.changelog.resync_take(chunk)
        if taken is None:
            return False
        offset, length, token = taken
        try:
            if self.disk.is_hole(offset, length):
                kind, data = lw.KIND_ZERO, None
            else:
                data = self.disk.read(offset, length)
                kind = lw.KIND_ZERO if self.disk.all_zero(data) else lw.KIND_WRITE
                if kind == lw.KIND_ZERO:
                    data = None
        except OSError as e:
            self.changelog.resync_abort(token, offset, length)
            log("resync read of %d bytes at %d failed: %s" % (length, offset, e))
            self._stop.wait(RETRY_INTERVAL)
            return False
        self.changelog.commit(token, kind, offset, length, data, flags=lw.FLAG_RESYNC)
        return True

    def _read(self, sock: socket.socket, errors: list) -> None:
        try:
            while True:
                msg_type, length = lw.unpack_header(recv_exact(sock, lw.HEADER.size))
                payload = recv_exact(sock, length)
                if msg_type == lw.MSG_ACK:
                    self.changelog.ack(*lw.unpack_ack(payload))
                    self.state_due = True
                elif msg_type == lw.MSG_REWIND:
                    self.changelog.rewind()
                elif msg_type == lw.MSG_FENCE:
                    fence = lw.unpack_json(payload)
                    reason = str(fence.get("reason") or "fenced by the agent")
                    self.changelog.fenced = reason if fence.get("fenced") else None
                    log("writes %s: %s" % ("refused (EROFS)" if fence.get("fenced")
                                           else "taken again", reason))
                elif msg_type == lw.MSG_RESYNC:
                    ranges = _ranges(lw.unpack_json(payload), self.disk.size)
                    self.changelog.mark_dirty(ranges)
                    log("resync of %d range(s), %d bytes, asked by the agent"
                        % (len(ranges), sum(n for _o, n in ranges)))
                elif msg_type == lw.MSG_SYNC_REQ:
                    token = lw.unpack_json(payload).get("token")
                    if not isinstance(token, str):
                        raise lw.ProtocolError("SYNC_REQ without a token")
                    self.changelog.request_sync(token)
                else:
                    raise lw.ProtocolError("unexpected message type %d from agent" % msg_type)
        except (OSError, lw.ProtocolError) as e:
            if not self._stop.is_set():
                errors.append(e)


def _ranges(obj: Any, size: int) -> List[Tuple[int, int]]:
    """The ranges of a RESYNC message, each within the disk (else ProtocolError)."""
    raw = obj.get("ranges") if isinstance(obj, dict) else None
    if not isinstance(raw, list) or len(raw) > lw.MAX_RESYNC_RANGES:
        raise lw.ProtocolError("RESYNC without a list of ranges")
    out = []
    for r in raw:
        if not (isinstance(r, list) and len(r) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) for x in r)
                and r[0] >= 0 and r[1] > 0 and r[0] + r[1] <= size):
            raise lw.ProtocolError("RESYNC range %r is not within the disk" % (r,))
        out.append((r[0], r[1]))
    return out
