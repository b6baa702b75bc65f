"""Whole frames duplicated, reordered and replayed on a live link (a frame-aware relay
between the sites): site B drops what it already holds, refuses a gap without touching a
replica, the source resends from site B's durable point, and the oracle passes the end."""

from __future__ import annotations

import socket
import threading
from typing import Dict, Iterator, List, Optional

import pytest
from conftest import Lab
from test_faults import wait_for

from agent.protocol import frames
from lab.oracle import OracleWriter, check

MiB = 1024 * 1024


def _exact(sock: socket.socket, n: int) -> Optional[bytes]:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            return None
        buf += chunk
    return buf


class FrameRelay:
    """Relays A -> B frame by frame and B -> A as bytes. ``mode``: ``clean``, ``dup``
    (every 5th BATCH twice), ``reorder`` (every 7th BATCH held back behind the next one) or
    ``replay`` (a BATCH of an earlier connection sent again, after the new one's 3rd)."""

    def __init__(self, target: tuple) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.address = "127.0.0.1:%d" % self.listener.getsockname()[1]
        self.mode = "clean"
        self.counts: Dict[str, int] = {"dup": 0, "reorder": 0, "replay": 0, "batches": 0}
        self.old: List[bytes] = []   # batches of closed connections
        self.socks: List[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            up = socket.create_connection(self.target)
            self.socks += [down, up]
            threading.Thread(target=self._a_to_b, args=(down, up), daemon=True).start()
            threading.Thread(target=self._b_to_a, args=(up, down), daemon=True).start()

    def _b_to_a(self, up: socket.socket, down: socket.socket) -> None:
        try:
            while True:
                data = up.recv(65536)
                if not data:
                    break
                down.sendall(data)
        except OSError:
            pass
        for s in (up, down):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _a_to_b(self, down: socket.socket, up: socket.socket) -> None:
        held: Optional[bytes] = None
        mine: List[bytes] = []
        n = 0
        try:
            while True:
                head = _exact(down, frames.HEADER.size)
                if head is None:
                    break
                length = frames.HEADER.unpack(head)[4]
                body = _exact(down, length)
                if body is None:
                    break
                frame = head + body
                if frames.HEADER.unpack(head)[2] != frames.T_BATCH:
                    up.sendall(frame)
                    continue
                n += 1
                self.counts["batches"] += 1
                mine.append(frame)
                if held is not None:
                    up.sendall(frame + held)  # the held one after its successor
                    held = None
                    continue
                if self.mode == "dup" and n % 5 == 0:
                    self.counts["dup"] += 1
                    up.sendall(frame + frame)
                elif self.mode == "reorder" and n % 7 == 0:
                    self.counts["reorder"] += 1
                    held = frame
                elif self.mode == "replay" and n == 3 and self.old:
                    self.counts["replay"] += 1
                    up.sendall(self.old[len(self.old) // 2] + frame)
                else:
                    up.sendall(frame)
        except OSError:
            pass
        self.old += mine[-20:]
        for s in (up, down):
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def reconnect(self) -> None:
        """Close every relayed connection (the source opens a new session)."""
        for s in self.socks:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def close(self) -> None:
        self.listener.close()
        self.reconnect()


@pytest.fixture
def relayed(sites: Lab) -> Iterator[tuple]:
    host, port = sites.b.address.rsplit(":", 1)
    relay = FrameRelay((host, int(port)))
    try:
        yield sites, relay
    finally:
        relay.close()


def test_duplicated_reordered_and_replayed_frames(relayed) -> None:
    lab, relay = relayed
    disks = [lab.image("vda.img", 8 * MiB), lab.image("vdb.img", 8 * MiB)]
    out = lab.a.ferry("protect", "g1", *[a for d in disks for a in (
        "--disk", "%s=%s" % (d.stem, d))], "--target", relay.address).stdout
    uris = dict(line.split("\t") for line in out.strip().splitlines())
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 8 * MiB, seed=51, blocks=1024, pause=0.002)
    writer.start()
    try:
        for mode, enough in (("dup", 2), ("reorder", 2), ("replay", 1)):
            relay.mode = mode
            if mode == "replay":
                relay.reconnect()
            wait_for(lambda m=mode, k=enough: relay.counts[m] >= k, timeout=60,
                     what="%s frames (%s)" % (mode, relay.counts))
        relay.mode = "clean"
    finally:
        barrier = writer.finish()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    images = {n: str(lab.restore("g1", n)) for n in ("vda", "vdb")}
    v = check(images, writer.log, barrier)
    assert v.prefix == writer.log.acked, v
    log = lab.b.log.read_text()
    assert "leaves a gap" in log and "no replica was touched" in log, log[-3000:]
    assert "Traceback" not in log
    print("\nframes: %s; oracle prefix %d of %d" % (relay.counts, v.prefix, writer.log.acked))
