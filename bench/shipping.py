"""Sustained shipping, source to durable journal on loopback, next to the limits it works
within: raw trio TCP, zstd level 1 on the same data, durable appends, and the splitter.

    python bench/shipping.py [--quick] [--burst MiB] [--reps N] [--out FILE]

Two agents on loopback, one disk protected with a queue larger than the burst. The group is
paused (``ferry pause``), fio writes the burst through the splitter (1 MiB sequential writes,
QD 4, half-compressible data): every change waits in the splitter's queue, and fio's rate is
the splitter's own. Then ``ferry resume``, and the time until ``wait --synced`` returns
(every change durable in site B's journal and acked) gives the shipping rate. A second
variant ships a burst from the dirty map instead (a queue of 8 MiB, so the changes spill and
are read back from the disk by the resync).

Limits measured in the same run, interleaved with the repetitions:

- ``tcp``: a trio sender pushing 4 MiB chunks (the agents' batch size) over loopback to a
  receiver in another process, as the two agents are;
- ``zstd-1``: ``zstandard`` level 1 (the wire's) compressing the burst's own bytes, read
  back from the image, in 4 MiB chunks, one thread;
- ``durable append``: 4 MiB writes each followed by fdatasync, into a file beside site B's
  data (a journal's pattern).

The ratio reported is shipping MB/s over the slowest of those limits and the splitter's own
rate, in each repetition, the median of those; goal: at least 80 %. The CPU the splitters
and both agents used while shipping (cores, from /proc/PID/stat) says whether the path was
busy or waiting.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
import trio
import zstandard
from pair import Pair, run

MiB = 1024 * 1024
CHUNK = 4 * MiB
GROUP = "ship"
FIO_DATA = ["--buffer_compress_percentage=50", "--refill_buffers"]


def sink() -> None:
    """The TCP receiver: print the port, take everything until EOF, print the byte count."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    print(srv.getsockname()[1], flush=True)
    conn, _ = srv.accept()
    total = 0
    buf = bytearray(1 << 20)
    while True:
        n = conn.recv_into(buf)
        if not n:
            break
        total += n
    conn.sendall(b"%d\n" % total)
    conn.close()


def tcp_rate(seconds: float) -> float:
    """MB/s a trio sender pushes over loopback to a receiver in another process."""
    proc = subprocess.Popen([sys.executable, __file__, "--sink"], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    port = int(proc.stdout.readline())
    payload = os.urandom(CHUNK)

    async def send() -> float:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        sent = 0
        t = time.monotonic()
        while time.monotonic() - t < seconds:
            await stream.send_all(payload)
            sent += len(payload)
        await stream.send_eof()
        got = b""
        while not got.endswith(b"\n"):
            chunk = await stream.receive_some(64)
            if not chunk:
                break
            got += chunk
        elapsed = time.monotonic() - t
        await stream.aclose()
        assert int(got) == sent, "the receiver got %s of %d bytes" % (got, sent)
        return sent / elapsed / 1e6

    try:
        return trio.run(send)
    finally:
        proc.wait(10)


def zstd_rate(image: Path, size: int) -> Dict[str, float]:
    """zstd level 1 over the image's first ``size`` bytes in 4 MiB chunks: MB/s in, ratio."""
    cctx = zstandard.ZstdCompressor(level=1)
    out = 0
    busy = 0.0
    with open(image, "rb") as f:
        done = 0
        while done < size:
            data = f.read(min(CHUNK, size - done))
            if not data:
                break
            t = time.perf_counter()
            out += len(cctx.compress(data))
            busy += time.perf_counter() - t
            done += len(data)
    return {"mb_s": done / busy / 1e6, "ratio": out / done}


def append_rate(directory: Path, size: int) -> float:
    """MB/s of 4 MiB appends, each fdatasync'd, into a new file in ``directory``."""
    path = directory / "append.bench"
    data = os.urandom(CHUNK)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        t = time.monotonic()
        for _ in range(max(1, size // CHUNK)):
            os.write(fd, data)
            os.fdatasync(fd)
        return max(1, size // CHUNK) * CHUNK / (time.monotonic() - t) / 1e6
    finally:
        os.close(fd)
        path.unlink()


def ship_burst(p: Pair, group: str, uri: str, image: Path, burst: int) -> Dict[str, Any]:
    """Pause, write the burst through the splitter, resume, time until synced."""
    p.a.ferry("pause", group)
    before = p.a.status(group)["groups"][group]
    sent0 = before["bytes_sent"]
    out = run(["fio", "--name=burst", "--ioengine=nbd", "--uri=" + uri, "--size=%d" % burst,
               "--rw=write", "--bs=1m", "--iodepth=4", "--output-format=json", *FIO_DATA])
    splitter = report.fio_write(report.fio_json(out.stdout)["jobs"][0])
    time.sleep(0.6)  # the splitter's counters reach the status every 0.5 s
    mid = p.a.status(group)["groups"][group]["disks"][image.stem]
    assert p.a.proc is not None and p.b.proc is not None
    pids = {"splitters": p.a.splitter_pids(), "agent A": [p.a.proc.pid],
            "agent B": [p.b.proc.pid]}
    cpu0 = {k: sum(report.cpu_seconds(x) for x in v) for k, v in pids.items()}
    t = time.monotonic()
    p.a.api("POST", "/v1/groups/%s/resume" % group)
    p.a.api("POST", "/v1/groups/%s/wait" % group, {"timeout": 600}, timeout=630)
    seconds = time.monotonic() - t
    cores = {k: (sum(report.cpu_seconds(x) for x in v) - cpu0[k]) / seconds
             for k, v in pids.items()}
    after = p.a.status(group)["groups"][group]
    return {"splitter_mb_s": splitter["mb_s"], "ship_s": seconds,
            "ship_mb_s": burst / seconds / 1e6, "queued_bytes": mid["bytes_queued"],
            "dirty_bytes": mid["dirty_bytes"],
            "frame_bytes": after["bytes_sent"] - sent0, "cores": cores}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="a smaller burst, one repetition")
    ap.add_argument("--burst", type=int, default=None, help="MiB written per burst")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--sink", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.sink:
        sink()
        return 0
    burst = (args.burst or (192 if args.quick else 1024)) * MiB
    reps = args.reps or (1 if args.quick else 3)
    tcp_seconds = 1.0 if args.quick else 3.0
    runs: List[Dict[str, Any]] = []
    with Pair("fys") as p:
        img_q = p.image("vda", burst)
        img_r = p.image("vdb", burst)
        uri_q = p.protect(GROUP, [img_q], "--queue", "%dM" % (burst // MiB + 64))["vda"]
        uri_r = p.protect(GROUP + "r", [img_r], "--queue", "8M")["vdb"]
        p.a.ferry("wait", GROUP, "--synced", "--timeout", "300")
        p.a.ferry("wait", GROUP + "r", "--synced", "--timeout", "300")
        for rep in range(reps):
            r: Dict[str, Any] = {}
            r["queue"] = ship_burst(p, GROUP, uri_q, img_q, burst)
            r["resync"] = ship_burst(p, GROUP + "r", uri_r, img_r, burst)
            r["tcp_mb_s"] = tcp_rate(tcp_seconds)
            r["zstd"] = zstd_rate(img_q, burst)
            r["append_mb_s"] = append_rate(p.root, min(burst, 512 * MiB))
            runs.append(r)
            q, s = r["queue"], r["resync"]
            print("rep %d: splitter %.0f MB/s | shipped from queue %.0f MB/s (%.1f s, queued "
                  "%d MiB, dirty %d MiB) | from dirty map %.0f MB/s | tcp %.0f MB/s | zstd-1 "
                  "%.0f MB/s (ratio %.2f) | durable append %.0f MB/s" % (
                      rep + 1, q["splitter_mb_s"], q["ship_mb_s"], q["ship_s"],
                      q["queued_bytes"] // MiB, q["dirty_bytes"] // MiB, s["ship_mb_s"],
                      r["tcp_mb_s"], r["zstd"]["mb_s"], r["zstd"]["ratio"], r["append_mb_s"]),
                  flush=True)
            print("       CPU while shipping from the queue (cores): %s" % ", ".join(
                "%s %.2f" % kv for kv in q["cores"].items()), flush=True)
    med = {
        "ship_queue": report.median([r["queue"]["ship_mb_s"] for r in runs]),
        "ship_resync": report.median([r["resync"]["ship_mb_s"] for r in runs]),
        "splitter": report.median([r["queue"]["splitter_mb_s"] for r in runs]),
        "tcp": report.median([r["tcp_mb_s"] for r in runs]),
        "zstd-1": report.median([r["zstd"]["mb_s"] for r in runs]),
        "durable append": report.median([r["append_mb_s"] for r in runs]),
    }
    limits = {k: med[k] for k in ("splitter", "tcp", "zstd-1", "durable append")}
    slowest = min(limits, key=lambda k: limits[k])
    print()
    print("%-34s %10s" % ("median of %d" % reps, "MB/s"))
    for k, v in med.items():
        print("%-34s %10.0f%s" % (k, v, "   <- slowest limit" if k == slowest else ""))
    # Each repetition's ratio to its own slowest limit (measured beside it), the median.
    ratio = report.median([r["queue"]["ship_mb_s"] / min(
        r["queue"]["splitter_mb_s"], r["tcp_mb_s"], r["zstd"]["mb_s"], r["append_mb_s"])
        for r in runs])
    figures = [
        report.figure(
            "sustained shipping MB/s, source to durable journal, loopback",
            "%.0f MB/s from the queue (%.0f MB/s from the dirty map)"
            % (med["ship_queue"], med["ship_resync"]),
            "slowest limit %s %.0f MB/s (splitter %.0f, tcp %.0f, zstd-1 %.0f, durable "
            "append %.0f)" % (slowest, limits[slowest], med["splitter"], med["tcp"],
                              med["zstd-1"], med["durable append"]),
            ratio, ">= 80% of the slowest limit", ratio >= 0.8,
            **{k.replace(" ", "_").replace("-", ""): v for k, v in med.items()}),
    ]
    cores = {k: report.median([r["queue"]["cores"][k] for r in runs])
             for k in runs[0]["queue"]["cores"]}
    print("CPU while shipping from the queue, cores (of %d): %s" % (
        os.cpu_count() or 0, ", ".join("%s %.2f" % kv for kv in cores.items())))
    report.print_figures(figures)

    def draw(plt: Any) -> None:
        names = ["shipped\n(queue)", "shipped\n(dirty map)", "splitter", "tcp", "zstd-1",
                 "durable\nappend"]
        values = [med["ship_queue"], med["ship_resync"], med["splitter"], med["tcp"],
                  med["zstd-1"], med["durable append"]]
        colors = ["tab:blue", "tab:blue", "tab:gray", "tab:gray", "tab:gray", "tab:gray"]
        plt.bar(names, values, color=colors)
        plt.axhline(0.8 * limits[slowest], ls="--", lw=0.8, color="black",
                    label="80% of the slowest limit")
        plt.ylabel("MB/s")
        plt.title("shipping, source to durable journal, loopback (median of %d)" % reps,
                  fontsize=10)
        plt.legend(fontsize=8)

    png = report.plot("shipping", draw)
    report.write("shipping", args.out, {"burst_bytes": burst, "reps": reps,
                                        "tcp_seconds": tcp_seconds, "fio_data": FIO_DATA},
                 figures, runs=runs, median=med, cores_while_shipping=cores,
                 plot=str(png) if png else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
