"""Replication throughput with TLS on and off, in the same run.

    python bench/tls_throughput.py [--quick] [--size MiB] [--reps N] [--out FILE]

Two measurements, each alternating plain and TLS, repeated, the median reported:

1. transport: 1 MiB frames of random bytes from one trio task to another over loopback,
   through a plain TCP stream and through the same TLS 1.3 setup the agents use
   (``agent.tls`` contexts, a certificate each side, ``TLSSocketStream``), and through
   ``trio.SSLStream`` for comparison. Both ends share one thread here, so each figure is
   the sender's and the receiver's work on one core.
2. end to end: the initial sync of a disk holding random data (incompressible, so
   compression hides nothing) between two agents on this machine: ``--insecure`` sites
   next to TLS-paired sites. ``protect`` to ``wait --synced``; the replica is checked.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent import tls
from agent.protocol.stream import read_exact
from lab.sites import Site

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent


# --- transport ------------------------------------------------------------------------------


async def _transport(total: int, kind: str, tmp: Path) -> float:
    """MB/s of ``total`` bytes in 1 MiB frames; ``kind``: plain, tls or trio-ssl."""
    frame = os.urandom(MiB)
    server_id = tls.load_identity(str(tmp / "srv"), "srv")
    client_id = tls.load_identity(str(tmp / "cli"), "cli")
    server_ctx = tls.server_context(server_id, [client_id.cert_pem])
    client_ctx = tls.client_context(client_id, [server_id.cert_pem])
    done = trio.Event()
    elapsed = [0.0]

    async def wrap(stream: trio.SocketStream, server: bool) -> trio.abc.Stream:
        if kind == "plain":
            return stream
        if kind == "trio-ssl":
            s: Any = trio.SSLStream(stream, server_ctx if server else client_ctx,
                                    server_side=server,
                                    server_hostname=None if server else tls.SNI)
        else:
            s = tls.TLSSocketStream(stream, server_ctx if server else client_ctx, server)
        await s.do_handshake()
        return s  # type: ignore[no-any-return]

    async def handler(stream: trio.SocketStream) -> None:
        s = await wrap(stream, True)
        t = time.perf_counter()
        got = 0
        while got < total:
            got += len(await read_exact(s, MiB, "client"))
        elapsed[0] = time.perf_counter() - t
        done.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(functools.partial(trio.serve_tcp, handler, 0,
                                                          host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        stream = await wrap(await trio.open_tcp_stream("127.0.0.1", port), False)
        for _ in range(total // MiB):
            await stream.send_all(frame)
        await done.wait()
        await stream.aclose()
        nursery.cancel_scope.cancel()
    return total / elapsed[0] / 1e6


# --- end to end -----------------------------------------------------------------------------


def _sync(work: Path, image: Path, secure: bool) -> dict:
    root = work / "r"
    root.mkdir(exist_ok=True)
    a, b = Site("A", root, insecure=not secure), Site("B", root, insecure=not secure)
    try:
        b.start()
        a.start()
        if secure:
            a.pair_with(b)
        t = time.monotonic()
        a.ferry("protect", "s", "--disk", "vda=%s" % image, "--target", b.address)
        a.ferry("wait", "s", "--synced", "--timeout", "1800")
        seconds = time.monotonic() - t
        restored = work / "restored.img"
        b.ferry("restore", "s", "--disk", "vda", "--to", str(restored))
        same = subprocess.run(["cmp", "-s", str(image), str(restored)]).returncode == 0
        restored.unlink()
        mode = a.status()["security"]["mode"]
        a.ferry("unprotect", "s")
        return {"seconds": seconds, "identical": same, "mode": mode}
    finally:
        for site in (a, b):
            site.stop()
            site.kill_splitters()
        shutil.rmtree(root, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="disk size in MiB (end to end)")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "tls_throughput.json"))
    args = ap.parse_args()
    size = (args.size or (128 if args.quick else 512)) * MiB
    reps = args.reps or (1 if args.quick else 3)
    transport_bytes = (512 if args.quick else 2048) * MiB
    work = Path(tempfile.mkdtemp(prefix="fyt", dir="/tmp"))
    try:
        transport: dict = {"plain": [], "tls": [], "trio-ssl": []}
        for _rep in range(max(reps, 3)):
            for kind in transport:
                transport[kind].append(trio.run(_transport, transport_bytes, kind, work))
        image = work / "disk.img"
        with open(image, "wb") as f:
            for _ in range(size // MiB):
                f.write(os.urandom(MiB))
        sync: dict = {"plain": [], "tls": []}
        for rep in range(reps):
            for mode in ("plain", "tls"):
                r = _sync(work, image, mode == "tls")
                r["mb_s"] = size / r["seconds"] / 1e6
                sync[mode].append(r)
                print("rep %d %-5s: initial sync %.1f s (%.0f MB/s) identical %s (%s)"
                      % (rep + 1, mode, r["seconds"], r["mb_s"], r["identical"], r["mode"]),
                      flush=True)
        med = {
            "transport_plain_mb_s": statistics.median(transport["plain"]),
            "transport_tls_mb_s": statistics.median(transport["tls"]),
            "transport_trio_ssl_mb_s": statistics.median(transport["trio-ssl"]),
            "sync_plain_mb_s": statistics.median(r["mb_s"] for r in sync["plain"]),
            "sync_tls_mb_s": statistics.median(r["mb_s"] for r in sync["tls"]),
        }
        print()
        print("%-34s %10s %10s %8s" % ("", "plain", "TLS", "TLS/plain"))
        print("%-34s %10.0f %10.0f %7.0f%%" % (
            "transport, 1 MiB frames (MB/s)", med["transport_plain_mb_s"],
            med["transport_tls_mb_s"],
            100 * med["transport_tls_mb_s"] / med["transport_plain_mb_s"]))
        print("%-34s %10s %10.0f %7.0f%%   (trio.SSLStream, for comparison)" % (
            "", "", med["transport_trio_ssl_mb_s"],
            100 * med["transport_trio_ssl_mb_s"] / med["transport_plain_mb_s"]))
        print("%-34s %10.0f %10.0f %7.0f%%" % (
            "initial sync %d MiB random (MB/s)" % (size // MiB), med["sync_plain_mb_s"],
            med["sync_tls_mb_s"], 100 * med["sync_tls_mb_s"] / med["sync_plain_mb_s"]))
        report = {"benchmark": "tls_throughput", "date": time.strftime("%F %T %z"),
                  "disk_bytes": size, "transport_bytes": transport_bytes, "reps": reps,
                  "transport_mb_s": transport, "sync": sync, "median": med,
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "figures": [
                      {"figure": "TLS on/off: 1 MiB frames over loopback (one thread both ends)",
                       "ferry": "%.0f MB/s with TLS" % med["transport_tls_mb_s"],
                       "baseline": "plain TCP %.0f MB/s (trio.SSLStream %.0f MB/s)"
                                   % (med["transport_plain_mb_s"],
                                      med["transport_trio_ssl_mb_s"]),
                       "ratio": round(med["transport_tls_mb_s"]
                                      / med["transport_plain_mb_s"], 4),
                       "goal": "", "met": None},
                      {"figure": "TLS on/off: initial sync of %d MiB random data" % (size // MiB),
                       "ferry": "%.0f MB/s with TLS" % med["sync_tls_mb_s"],
                       "baseline": "--insecure (plain TCP) %.0f MB/s" % med["sync_plain_mb_s"],
                       "ratio": round(med["sync_tls_mb_s"] / med["sync_plain_mb_s"], 4),
                       "goal": "", "met": None}]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print("wrote %s" % args.out)
        ok = all(r["identical"] for runs in sync.values() for r in runs)
        ok = ok and all(r["mode"] == ("tls" if m == "tls" else "insecure")
                        for m, runs in sync.items() for r in runs)
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
