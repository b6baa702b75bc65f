"""Site B's write path next to the disk it writes: initial sync and shipping ingest rates,
and bytes written per byte replicated, against the disk's own durable sequential rate.

    python bench/target_write.py [--quick] [--size MiB] [--reps N] [--out FILE]

All in one directory (under ``--dir``, default /tmp: the agents' data in the other
benchmarks), interleaved in each repetition:

- ``disk``: the disk's own durable sequential write rate: fio, O_DIRECT, libaio, 1 MiB
  writes at queue depth 8, an fdatasync every 16 MiB (site B's group commit), and the
  same at queue depth 1 with 4 MiB writes each fdatasynced (a strict floor);
- ``initial sync``: site B's code alone (``TargetGroup.accept`` in a child process, no
  network, no source): 1 MiB writes of a disk never whole yet, in accepts of 16 MiB (what
  the receive loop's group commit takes when frames queue up), then its ``consistent``
  marker; every byte goes straight to the replica (``apply_initial``);
- ``shipping``: the same group once whole, 1 MiB writes journaled (history 4 h: nothing
  promoted while they arrive), then promoted to the replica (the history window set to 0):
  the ingest rate is the journal's, the promotion rate is given beside it.

Each site-B run is done with both replica writers (``agent/target/aio.py``): ``python``
(the twin: buffered pwrite) and ``libaio`` (O_DIRECT, queue depth 8), when the ``libaio``
package imports; the journal's appends (write-behind, blocks allocated ahead) are the same
for both. ``--before TREE`` runs the site-B code of another checkout too, in the same
repetitions (``--before /work/main``: before/after side by side). Bytes written come from
the child's /proc/self/io (``write_bytes``: buffered writes are counted per page dirtied,
O_DIRECT ones by the byte; ``cancelled_write_bytes`` are dirty pages truncated or unlinked
before writeback, taken off), divided by the bytes replicated. Median and min-max over the
repetitions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List

# Ferry's packages first: no script in bench/ may hide one of its packages (as a
# bench/formats.py once hid the package ``formats``).
HERE = Path(__file__).resolve().parent
sys.path[:] = [str(HERE.parent)] + [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.append(str(HERE))

import report  # noqa: E402 (after the path is set)

MiB = 1024 * 1024
RECORD = MiB
COMMIT = 16 * MiB


def disk_rate(directory: Path, size: int, strict: bool) -> float:
    """MB/s of fio's O_DIRECT sequential writes made durable (see the module)."""
    path = directory / "disk.bench"
    job = (["--ioengine=psync", "--bs=4m", "--fdatasync=1"] if strict else
           ["--ioengine=libaio", "--bs=1m", "--iodepth=8", "--fdatasync=16"])
    try:
        out = subprocess.run(["fio", "--name=disk", "--filename=%s" % path, "--direct=1",
                              "--rw=write", "--size=%d" % size, "--output-format=json", *job],
                             capture_output=True, text=True, check=True)
        return report.fio_write(report.fio_json(out.stdout)["jobs"][0])["mb_s"]
    finally:
        path.unlink(missing_ok=True)


def _io() -> Dict[str, int]:
    return report.io_counters(os.getpid())


def child(directory: str, size: int, writer: str) -> Dict[str, Any]:
    """One site-B run in this process: initial sync, then shipping and its promotion.
    ``writer`` ``before=TREE``: the code of the checkout TREE (e.g. one without aio.py)."""
    if writer.startswith("before="):
        sys.path.insert(0, writer.split("=", 1)[1])
    from agent.target.group import TargetGroup
    from formats.records import KIND_CONSISTENT, KIND_WRITE, JRecord
    if not writer.startswith("before="):
        from agent.target import aio
        aio.prefer(writer)
    pool = [os.urandom(RECORD) for _ in range(16)]
    g = TargetGroup(directory, "b", [("vda", size)], protection="p", history_s=4 * 3600,
                    journal_max=1 << 40)
    seq = 0

    def stream(gen: int) -> float:
        nonlocal seq
        busy = 0.0
        for base in range(0, size, COMMIT):
            batch = []
            for off in range(base, min(size, base + COMMIT), RECORD):
                seq += 1
                batch.append(JRecord(0, gen, seq, KIND_WRITE, 0, off, RECORD, seq,
                                     pool[seq % len(pool)]))
            t = time.perf_counter()
            g.accept(batch)
            busy += time.perf_counter() - t
        return busy

    out: Dict[str, Any] = {"writer": writer}
    io0 = _io()
    busy = stream(1)
    seq += 1
    t = time.perf_counter()
    g.accept([JRecord(0, 1, seq, KIND_CONSISTENT, 0, 0, 0, seq, None)])
    busy += time.perf_counter() - t
    io1 = _io()
    out["sync_s"] = busy
    out["sync_io"] = {k: io1[k] - io0[k] for k in io1}
    busy = stream(1)
    io2 = _io()
    out["ship_s"] = busy
    t = time.perf_counter()
    g.history_s, g.journal_max = 0, 0  # every segment leaves, the last one too
    g.maintain()
    out["promote_s"] = time.perf_counter() - t
    io3 = _io()
    out["ship_io"] = {k: io2[k] - io1[k] for k in io2}
    out["promote_io"] = {k: io3[k] - io2[k] for k in io3}
    g.close()
    return out


def site_b(directory: Path, size: int, writer: str) -> Dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="ftw", dir=directory))
    try:
        out = subprocess.run([sys.executable, __file__, "--child", writer, str(work),
                              str(size)], capture_output=True, text=True, check=True)
        result: Dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
        return result
    finally:
        shutil.rmtree(work, ignore_errors=True)


def written(io: Dict[str, int]) -> int:
    return io["write_bytes"] - io.get("cancelled_write_bytes", 0)


def spread(xs: List[float]) -> str:
    return "%.0f (%.0f-%.0f)" % (statistics.median(xs), min(xs), max(xs))


def spread2(xs: List[float]) -> str:
    return "%.3f (%.3f-%.3f)" % (statistics.median(xs), min(xs), max(xs))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="256 MiB, 3 repetitions")
    ap.add_argument("--size", type=int, default=None, help="disk size in MiB")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--dir", default="/tmp")
    ap.add_argument("--writers", default=None, help="comma-separated: python,libaio")
    ap.add_argument("--before", default=None, metavar="TREE",
                    help="also run site B's code from this checkout (before: the same run)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child[1], int(args.child[2]), args.child[0])))
        return 0
    from agent.target import aio
    size = (args.size or (256 if args.quick else 1024)) * MiB
    reps = args.reps or 3
    writers = (args.writers.split(",") if args.writers else
               ["python", "libaio"] if aio.available("libaio") else ["python"])
    if args.before:
        writers.insert(0, "before=" + str(Path(args.before).resolve()))
    directory = Path(args.dir)
    runs: List[Dict[str, Any]] = []
    for rep in range(reps):
        r: Dict[str, Any] = {"disk_mb_s": disk_rate(directory, size, strict=False),
                             "disk_strict_mb_s": disk_rate(directory, size, strict=True)}
        for w in writers:
            b = site_b(directory, size, w)
            w = w.split("=")[0]
            b["sync_mb_s"] = size / b["sync_s"] / 1e6
            b["ship_mb_s"] = size / b["ship_s"] / 1e6
            b["promote_mb_s"] = size / b["promote_s"] / 1e6
            b["sync_wpb"] = written(b["sync_io"]) / size
            b["ship_wpb"] = (written(b["ship_io"]) + written(b["promote_io"])) / size
            r[w] = b
        runs.append(r)
        print("rep %d: disk %.0f MB/s (strict %.0f) | %s" % (
            rep + 1, r["disk_mb_s"], r["disk_strict_mb_s"], " | ".join(
                "%s: sync %.0f MB/s (%.3f B/B) ship %.0f MB/s promote %.0f MB/s (%.3f B/B)" % (
                    w, r[w]["sync_mb_s"], r[w]["sync_wpb"], r[w]["ship_mb_s"],
                    r[w]["promote_mb_s"], r[w]["ship_wpb"])
                for w in (w.split("=")[0] for w in writers))), flush=True)
    disk = [r["disk_mb_s"] for r in runs]
    print()
    print("%d MiB, %d repetitions, median (min-max); load average %s" % (
        size // MiB, reps, " ".join("%.1f" % x for x in os.getloadavg())))
    print("disk, O_DIRECT QD8 + fdatasync/16 MiB   %s MB/s" % spread(disk))
    print("disk, O_DIRECT QD1 4 MiB + fdatasync    %s MB/s" % spread(
        [r["disk_strict_mb_s"] for r in runs]))
    figures = []
    for w in (w.split("=")[0] for w in writers):
        sync = [r[w]["sync_mb_s"] for r in runs]
        ship = [r[w]["ship_mb_s"] for r in runs]
        print("%-7s initial sync %s MB/s, %s B written/B | shipping %s MB/s, promotion %s "
              "MB/s, %s B written/B" % (
                  w, spread(sync), spread2([r[w]["sync_wpb"] for r in runs]), spread(ship),
                  spread([r[w]["promote_mb_s"] for r in runs]),
                  spread2([r[w]["ship_wpb"] for r in runs])))
        for what, xs in (("initial sync", sync), ("shipping (journal)", ship)):
            ratio = statistics.median(x / d for x, d in zip(xs, disk))
            figures.append(report.figure(
                "site B %s MB/s, %s writer" % (what, w), "%s MB/s" % spread(xs),
                "disk O_DIRECT durable %s MB/s" % spread(disk), ratio,
                ">= 90% of the disk", ratio >= 0.9))
        wpb = statistics.median(r[w]["ship_wpb"] for r in runs)
        figures.append(report.figure(
            "site B bytes written per byte shipped (journal + replica), %s writer" % w,
            "%.3f" % wpb, "", None, "<= 2.1", wpb <= 2.1))
    report.print_figures(figures)
    report.write("target_write", args.out, {"size": size, "reps": reps, "record": RECORD,
                                            "commit": COMMIT, "writers": writers,
                                            "dir": str(directory)}, figures, runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
