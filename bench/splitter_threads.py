#!/usr/bin/env python3
"""How many requests the splitter should serve at once (``protect --splitter-threads N``):
a fast disk against a slow one, side by side.

    python bench/splitter_threads.py [--threads 16 4 2 1] [--reps 3] [--seconds 5]
                                     [--delay-ms 1] [--quick] [--out FILE]

Per repetition, for each N in turn, one group of two disks is protected with
``--splitter-threads N`` and synced, then fio (QD 16, 4 KiB) runs through the splitters:

- ``fast randwrite``: random writes to a 1 GiB image file (the page cache's speed),
  replicating; the splitter's CPU seconds per GiB written (nbdkit and its threads, from /proc).
- ``slow randread``: random reads, page cache dropped first, of a 512 MiB disk whose every
  read and write takes ``--delay-ms`` (nbdkit ``memory`` behind the ``delay`` filter, through
  nbdfuse and a direct-I/O loop device: a block device with a SAN's latency).
- ``slow randwrite+fsync``: random writes to the slow disk, an fsync every 16.

Concurrency costs CPU in the interpreter's lock when the disk answers at once, and hides
latency when it does not: the table shows both, median (min-max) over the repetitions.
Needs root (loop devices, drop_caches).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import Pair

GiB = 1 << 30
MiB = 1 << 20
FAST_SIZE = GiB
SLOW_SIZE = 512 * MiB
JOBS = {
    "fast randwrite": ("fast", ["--rw=randwrite"]),
    "slow randread": ("slow", ["--rw=randread"]),
    "slow randwrite+fsync": ("slow", ["--rw=randwrite", "--fsync=16"]),
}


class SlowDisk:
    """A block device with ``delay_ms`` on every read and write."""

    def __init__(self, work: Path, delay_ms: float) -> None:
        self.sock, self.pidfile = work / "slow.sock", work / "slow.pid"
        subprocess.run(["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile),
                        "--filter=delay", "memory", "size=%d" % SLOW_SIZE,
                        "rdelay=%gms" % delay_ms, "wdelay=%gms" % delay_ms], check=True)
        self.mnt = work / "slow-mnt"
        self.mnt.mkdir()
        self.fuse = subprocess.Popen(["nbdfuse", str(self.mnt),
                                      "nbd+unix:///?socket=%s" % self.sock])
        deadline = time.monotonic() + 30
        while not (self.mnt / "nbd").exists():
            if time.monotonic() > deadline:
                raise RuntimeError("nbdfuse did not mount %s" % self.mnt)
            time.sleep(0.05)
        self.loop = subprocess.run(
            ["losetup", "--find", "--show", "--direct-io=on", str(self.mnt / "nbd")],
            check=True, capture_output=True, text=True).stdout.strip()

    def close(self) -> None:
        subprocess.run(["losetup", "-d", self.loop], check=False)
        subprocess.run(["umount", "-l", str(self.mnt)], check=False, stderr=subprocess.DEVNULL)
        self.fuse.terminate()
        self.fuse.wait(10)
        if self.pidfile.exists():
            os.kill(int(self.pidfile.read_text()), 15)


def fio(uri: str, size: int, job: List[str], seconds: int) -> Dict[str, float]:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--size=%d" % size,
           "--bs=4k", "--iodepth=16", "--runtime=%d" % seconds, "--time_based",
           "--output-format=json", *job]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    result = report.fio_json(proc.stdout)["jobs"][0]
    side = result["read"] if "--rw=randread" in job else result["write"]
    return {"iops": side["iops"], "bytes": side["io_bytes"]}


def one(slow: SlowDisk, threads: int, seconds: int) -> Dict[str, Dict[str, float]]:
    """Protect both disks with ``--splitter-threads threads`` on a new pair of sites, run the
    jobs; the pair's directory (images, journal) is removed after."""
    with Pair("fst") as pair:
        a, b = pair.a, pair.b
        fast = pair.image("fast", FAST_SIZE)
        out = a.ferry("protect", "g", "--disk", "fast=%s" % fast, "--disk",
                      "slow=%s" % slow.loop, "--target", b.address,
                      "--splitter-threads", str(threads)).stdout
        uris = dict(line.split("\t") for line in out.strip().splitlines())
        a.ferry("wait", "g", "--synced", "--timeout", "600")
        pids = {}
        for name in ("fast", "slow"):
            pids[name] = next(p for p in a.splitter_pids() if _serves(p, name))
        res = {}
        for job, (disk, args) in JOBS.items():
            cpu = report.cpu_seconds(pids[disk])
            r = fio(uris[disk], FAST_SIZE if disk == "fast" else SLOW_SIZE, args, seconds)
            r["cpu_s_per_gib"] = (report.cpu_seconds(pids[disk]) - cpu) / (r["bytes"] / GiB)
            res[job] = r
            a.ferry("wait", "g", "--synced", "--timeout", "600")
        a.ferry("unprotect", "g")
        return res


def _serves(pid: int, disk: str) -> bool:
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        return b"name=" + disk.encode() in f.read().split(b"\0")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[16, 4, 2, 1])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--delay-ms", type=float, default=1.0)
    ap.add_argument("--quick", action="store_true", help="16 and 1 thread, 2 s, one repetition")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.threads, args.reps, args.seconds = [16, 1], 1, 2
    load, began = os.getloadavg(), time.gmtime()
    work = Path(tempfile.mkdtemp(prefix="fst", dir="/tmp"))
    slow = SlowDisk(work, args.delay_ms)
    runs: Dict[int, List[Dict[str, Dict[str, float]]]] = {n: [] for n in args.threads}
    try:
        for rep in range(args.reps):
            for n in args.threads:
                r = one(slow, n, args.seconds)
                runs[n].append(r)
                print("rep %d threads %2d  " % (rep + 1, n) + "  ".join(
                    "%s %.0f IOPS" % (job, x["iops"]) for job, x in r.items()), flush=True)
    finally:
        slow.close()
        shutil.rmtree(work, ignore_errors=True)
    print("\nsplitter_threads: %s UTC, Ferry %s, load average at the start %.2f %.2f %.2f; "
          "%d s runs, %d repetition(s), %g ms slow disk\n" % (
              time.strftime("%F %H:%M", began), report._git_head(), *load,
              args.seconds, args.reps, args.delay_ms))
    print("| --splitter-threads | " + " | ".join(
        "%s IOPS" % job for job in JOBS) + " | fast randwrite, splitter CPU-s/GiB |")
    print("| --- " * (len(JOBS) + 2) + "|")

    def cell(xs: List[float], fmt: str = "%.0f") -> str:
        return (fmt + " (" + fmt + "-" + fmt + ")") % (statistics.median(xs), min(xs), max(xs))
    for n in args.threads:
        print("| %d | " % n + " | ".join(
            cell([r[job]["iops"] for r in runs[n]]) for job in JOBS) + " | " +
            cell([r["fast randwrite"]["cpu_s_per_gib"] for r in runs[n]], "%.1f") + " |")
    figures = []
    low, high = min(args.threads), max(args.threads)
    for job in JOBS:
        few = statistics.median(r[job]["iops"] for r in runs[low])
        many = statistics.median(r[job]["iops"] for r in runs[high])
        figures.append(report.figure(
            "%s IOPS (4 KiB, QD 16), --splitter-threads %d" % (job, low), "%.0f IOPS" % few,
            "%.0f IOPS with %d threads" % (many, high), few / many))
    report.print_figures(figures)
    report.write("splitter_threads", args.out, vars(args), figures, loadavg_start=load,
                 runs={str(n): v for n, v in runs.items()})


if __name__ == "__main__":
    main()
