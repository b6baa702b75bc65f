"""Shipping over a slow link: throughput through a link with a bandwidth cap and a delay,
next to what that link carries.

    python bench/slow_link.py [--quick] [--mbit 100] [--rtt-ms 20] [--mib N] [--reps N]

The link is the lab's fault proxy (``lab/proxy.py``) made a delay line (``DelayLine``):
each direction passes bytes at ``--mbit`` (paced per 64 KiB chunk) and delivers each chunk
``rtt / 2`` after it was read, many chunks in flight (the proxy's own ``delay`` holds one
chunk at a time, which would cap the rate at 64 KiB per delay). Two real agents on loopback,
site A replicating to site B through it. Each repetition measures three rates:

- ``link``: what the delay line carries: one TCP stream pushing ``N`` MiB through it to a
  sink, rate of the bytes delivered between the first and the last chunk;
- ``initial sync``: a new group of one disk of ``N`` MiB of random bytes (zstd cannot
  shrink them), protected; rate = bytes the proxy passed from A to B between the first and
  the last chunk of the sync; ``wait --synced`` must return;
- ``writes``: ``N`` MiB of random 1 MiB writes through the splitter at full speed after the
  sync, the same rate until synced again.

A shipping rate is the disk's bytes shipped over the time from the first to the last chunk
A sent through the link (``initial sync``, ``writes``); the ``wire`` rates are the bytes the
link carried over that time (frames, headers and acks' share included).

Printed: median and min-max of each over the repetitions, and each shipping rate as a share
of the nominal link rate and of the measured ``link`` rate (goal: at least 80 %).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import nbd
import trio
from pair import Pair

from lab.proxy import CHUNK, FaultProxy

MiB = 1024 * 1024


class DelayLine(FaultProxy):
    """The fault proxy as a link of ``rate`` bytes/s each way and ``delay`` s one way (see
    the module). ``window()`` starts counting A-to-B bytes and the times of the first and
    last chunk."""

    def __init__(self, target: Tuple[str, int], rate: float, delay: float) -> None:
        super().__init__(target)
        self.line_rate, self.line_delay = rate, delay
        self.sent = 0
        self.first: Optional[float] = None
        self.last: Optional[float] = None
        self._forward: set = set()

    def window(self) -> None:
        self.sent, self.first, self.last = 0, None, None

    def rate(self, payload: Optional[int] = None) -> float:
        """Bytes/s A to B between the first and the last chunk since ``window``: the bytes
        the link carried, or ``payload`` bytes (the disk's) over the same time."""
        if self.first is None or self.last is None or self.last <= self.first:
            return 0.0
        return (self.sent if payload is None else payload) / (self.last - self.first)

    async def _handle(self, downstream: trio.SocketStream) -> None:
        # Which pump runs A to B: the one reading the accepted (downstream) stream.
        self._forward.add(id(downstream))
        try:
            await super()._handle(downstream)
        finally:
            self._forward.discard(id(downstream))

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        forward = id(src) in self._forward
        send, recv = trio.open_memory_channel[Tuple[float, bytes]](256)

        async def read() -> None:
            async with send:
                while True:
                    data = await src.receive_some(CHUNK)
                    if not data:
                        return
                    await send.send((trio.current_time(), data))

        async def write() -> None:
            free = trio.current_time()
            async with recv:
                async for got, data in recv:
                    # Serialised at the link's rate, then delivered ``delay`` later.
                    start = max(free, got)
                    free = start + len(data) / self.line_rate
                    await trio.sleep_until(free + self.line_delay)
                    await dst.send_all(data)
                    self.bytes += len(data)
                    if forward:
                        now = time.monotonic()
                        if self.first is None:
                            self.first = now
                        else:
                            self.sent += len(data)  # bytes after the first chunk's end
                        self.last = now

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            nursery.start_soon(write)


def link_rate(line: DelayLine, nbytes: int) -> float:
    """One TCP stream of ``nbytes`` through ``line`` (pointed at a sink): its rate."""
    line.window()
    with socket.create_connection(("127.0.0.1", line.port)) as s:
        block = os.urandom(MiB)
        for _ in range(nbytes // MiB):
            s.sendall(block)
        s.shutdown(socket.SHUT_WR)
        s.recv(1)  # the sink closes once it has everything
    return line.rate()


def start_sink() -> int:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(4)

    def serve() -> None:
        while True:
            conn, _ = srv.accept()
            with conn:
                while conn.recv(1 << 20):
                    pass

    threading.Thread(target=serve, daemon=True).start()
    return int(srv.getsockname()[1])


def random_image(path: Path, size: int) -> None:
    with open(path, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))


def one(p: Pair, line: DelayLine, rep: int, size: int) -> Dict[str, float]:
    group = "s%d" % rep
    img = p.root / ("%s.img" % group)
    random_image(img, size)
    line.window()
    out = p.a.ferry("protect", group, "--disk", "vda=%s" % img, "--target",
                    line.address).stdout
    uri = dict(x.split("\t") for x in out.strip().splitlines())["vda"]
    p.a.ferry("wait", group, "--synced", "--timeout", "600")
    sync, sync_wire = line.rate(size), line.rate()
    h = nbd.NBD()
    h.connect_uri(uri)
    line.window()
    try:
        for i in range(size // MiB):
            h.pwrite(os.urandom(MiB), i * MiB)
        h.flush()
    finally:
        h.shutdown()
    p.a.ferry("wait", group, "--synced", "--timeout", "600")
    writes, writes_wire = line.rate(size), line.rate()
    p.a.ferry("unprotect", group)
    img.unlink()
    return {"initial sync": sync, "initial sync, wire": sync_wire, "writes": writes,
            "writes, wire": writes_wire}


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 MiB, 2 repetitions")
    ap.add_argument("--mbit", type=float, default=100.0)
    ap.add_argument("--rtt-ms", type=float, default=20.0)
    ap.add_argument("--mib", type=int, default=0)
    ap.add_argument("--reps", type=int, default=0)
    args = ap.parse_args(argv)
    mib = args.mib or (32 if args.quick else 128)
    reps = args.reps or (2 if args.quick else 5)
    rate = args.mbit * 1e6 / 8
    delay = args.rtt_ms / 2000
    print("slow link: %g Mbit/s (%.2f MB/s), RTT %g ms, %d MiB, %d repetitions, %s" % (
        args.mbit, rate / 1e6, args.rtt_ms, mib, reps,
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), flush=True)
    got: Dict[str, List[float]] = {"link": [], "initial sync": [], "initial sync, wire": [],
                                   "writes": [], "writes, wire": []}
    with Pair("fysl") as p:
        host, port = p.b.address.rsplit(":", 1)
        raw = DelayLine(("127.0.0.1", start_sink()), rate, delay)
        line = DelayLine((host, int(port)), rate, delay)
        raw.start()
        line.start()
        try:
            for rep in range(reps):
                got["link"].append(link_rate(raw, mib * MiB))
                for k, x in one(p, line, rep, mib * MiB).items():
                    got[k].append(x)
                print("  rep %d: %s" % (rep + 1, ", ".join(
                    "%s %.2f MB/s" % (k, v[-1] / 1e6) for k, v in got.items())), flush=True)
        finally:
            raw.close()
            line.close()
    link = statistics.median(got["link"])
    for k, v in got.items():
        med = statistics.median(v)
        extra = "" if k == "link" else "; %.0f %% of the nominal rate, %.0f %% of the link's" % (
            100 * med / rate, 100 * med / link)
        print("slow link: %-18s median %.2f MB/s (min %.2f, max %.2f)%s" % (
            k, med / 1e6, min(v) / 1e6, max(v) / 1e6, extra))
    return 0


if __name__ == "__main__":
    sys.exit(main())
