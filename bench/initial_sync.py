"""Initial sync of a disk that already holds data: Ferry next to nbdcopy, same disk, same run.

    python bench/initial_sync.py [--quick] [--size MiB] [--out FILE]

The disk is filled half with random data and half with text-like data (compressible),
with holes between. Ferry: ``protect`` then ``wait --synced`` between two agents on this
machine (the splitter reads the disk back, the agent ships it, site B journals and applies
it). Baseline: ``nbdcopy`` of the same image into an nbdkit ``file`` export. Repeated, the
median reported; the replica is checked against the source.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import start_sites

MiB = 1024 * 1024


def fill(path: Path, size: int) -> int:
    """Write data into ``path`` leaving holes; returns the bytes of data written."""
    rng = random.Random(1)
    words = [bytes(rng.choice(b"abcdefghij ") for _ in range(8)) for _ in range(512)]
    text = b" ".join(rng.choice(words) for _ in range(MiB // 8))[:MiB]
    written = 0
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4 * MiB):
            if (off // (4 * MiB)) % 4 == 3:
                continue  # a hole
            f.seek(off)
            for i in range(4):
                f.write(os.urandom(MiB) if (off // (4 * MiB) + i) % 2 else text)
            written += 4 * MiB
    return written


def ferry_sync(work: Path, image: Path) -> tuple:
    (work / "r").mkdir(exist_ok=True)
    a, b = start_sites(work / "r")
    try:
        t = time.monotonic()
        a.ferry("protect", "s", "--disk", "vda=%s" % image, "--target", b.address)
        a.ferry("wait", "s", "--synced", "--timeout", "1800")
        seconds = time.monotonic() - t
        restored = work / "restored.img"
        b.ferry("restore", "s", "--disk", "vda", "--to", str(restored))
        same = subprocess.run(["cmp", "-s", str(image), str(restored)]).returncode == 0
        sent = a.status("s")["groups"]["s"]["bytes_sent"]
        a.ferry("unprotect", "s")
        restored.unlink()
        return seconds, same, sent
    finally:
        for site in (a, b):
            site.stop()
            site.kill_splitters()
        shutil.rmtree(work / "r", ignore_errors=True)


def nbdcopy(work: Path, image: Path, size: int) -> float:
    dest = work / "copy.img"
    with open(dest, "wb") as f:
        f.truncate(size)
    sock, pid = work / "copy.sock", work / "copy.pid"
    subprocess.run(["nbdkit", "--unix", str(sock), "--pidfile", str(pid), "file", str(dest)],
                   check=True)
    try:
        t = time.monotonic()
        subprocess.run(["nbdcopy", "--flush", str(image), "nbd+unix:///?socket=%s" % sock],
                       check=True)
        return time.monotonic() - t
    finally:
        n = int(pid.read_text())
        os.kill(n, 15)
        deadline = time.monotonic() + 10
        while os.path.exists("/proc/%d" % n) and time.monotonic() < deadline:
            time.sleep(0.02)
        # The next repetition binds the same path: nbdkit may leave its socket behind.
        for leftover in (sock, pid, dest):
            leftover.unlink(missing_ok=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="disk size in MiB")
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    size = (args.size or (256 if args.quick else 1024)) * MiB
    reps = args.reps or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="fyi", dir="/tmp"))
    try:
        image = work / "disk.img"
        data = fill(image, size)
        runs = []
        for rep in range(reps):
            copy_s = nbdcopy(work, image, size)
            ferry_s, same, sent = ferry_sync(work, image)
            runs.append({"nbdcopy_s": copy_s, "ferry_s": ferry_s, "identical": same,
                         "frame_bytes_sent": sent})
            print("rep %d: nbdcopy %.1f s (%.0f MB/s)  ferry %.1f s (%.0f MB/s)  sent %.0f MB  "
                  "identical %s" % (rep + 1, copy_s, data / copy_s / 1e6, ferry_s,
                                    data / ferry_s / 1e6, sent / 1e6, same), flush=True)
        med_copy = statistics.median(r["nbdcopy_s"] for r in runs)
        med_ferry = statistics.median(r["ferry_s"] for r in runs)
        print()
        print("disk %d MiB, %d MiB of data (half random, half text), holes elsewhere"
              % (size // MiB, data // MiB))
        print("%-10s %8s %10s" % ("", "seconds", "MB/s data"))
        print("%-10s %8.1f %10.0f" % ("nbdcopy", med_copy, data / med_copy / 1e6))
        print("%-10s %8.1f %10.0f   (%.0f%% of nbdcopy)" % (
            "ferry", med_ferry, data / med_ferry / 1e6, 100 * med_copy / med_ferry))
        ratio = statistics.median(r["nbdcopy_s"] / r["ferry_s"] for r in runs)
        figures = [report.figure(
            "initial sync MB/s", "%.0f MB/s" % (data / med_ferry / 1e6),
            "nbdcopy %.0f MB/s" % (data / med_copy / 1e6), ratio, ">= 90% of nbdcopy",
            ratio >= 0.9, ferry_s=med_ferry, nbdcopy_s=med_copy)]
        report.print_figures(figures)
        report.write("initial_sync", args.out, {"disk_bytes": size, "data_bytes": data,
                                                "reps": reps}, figures, runs=runs,
                     median={"nbdcopy_s": med_copy, "ferry_s": med_ferry})
        return 0 if all(r["identical"] for r in runs) else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
