"""What a qcow2 source costs against a raw one: fio through two Ferry splitters.

    python bench/disk_formats.py [--quick] [--seconds N] [--reps N] [--out FILE]

Two disks of the same virtual size, each protected to a second agent on this machine
(replication running, after the initial sync): ``raw``, a raw file (the splitter writes it
directly), and ``qcow2``, a new qcow2 image (the splitter writes it through qemu-nbd). The
same fio jobs (``--ioengine=nbd``) run on each, interleaved (each once both disks' backlogs
have reached site B, so no replication of the run before competes for CPU), repeated, median
reported:
4 KiB random writes at queue depth 16 and 1 MiB sequential writes at queue depth 4. The
figure is qcow2 over raw (issue 17's goal: at least 0.7). At the end each disk is restored
from site B and compared with the splitter's export, the disk the guest sees (``qemu-img
compare``; the image file itself lags behind qemu-nbd's cache until the guest flushes).

Each run also prints the CPU time per request of the processes of that disk (its nbdkit
splitter and, for qcow2, its qemu-nbd, from ``/proc/PID/stat``) and of the two agents: on a
machine whose cores fio, the splitters, qemu-nbd and the agents share, the ratio is bounded
by CPU, and these figures say where it goes.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import start_sites

MiB = 1024 * 1024
JOBS = {
    "randwrite-4k-qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "seqwrite-1m-qd4": ["--rw=write", "--bs=1M", "--iodepth=4"],
}
KEY = {"randwrite-4k-qd16": "iops", "seqwrite-1m-qd4": "mb_s"}


def fio(uri: str, job: list, size: int, seconds: int) -> dict:
    os.sync()  # no dirty page cache of the run before lands on this one
    proc = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--size=%d" % size,
         "--runtime=%d" % seconds, "--time_based", "--output-format=json", *job],
        capture_output=True, text=True, check=True)
    return report.fio_write(report.fio_json(proc.stdout)["jobs"][0])


def cpu_seconds(pids: list) -> dict:
    """{pid: user + system CPU seconds so far} of the processes still there."""
    out = {}
    for pid in pids:
        try:
            with open("/proc/%d/stat" % pid) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            out[pid] = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            pass
    return out


def processes_of(path: Path) -> dict:
    """{pid: program} of the processes whose arguments name ``path`` (its splitter, its
    qemu-nbd)."""
    out = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open("/proc/%s/cmdline" % entry, "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
        except OSError:
            continue
        if any(arg == str(path) or arg.endswith("=" + str(path)) for arg in argv[1:]):
            out[int(entry)] = os.path.basename(argv[0])
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, one repetition")
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seconds = args.seconds or (3 if args.quick else 10)
    reps = args.reps or (1 if args.quick else 3)
    size = (256 if args.quick else 1024) * MiB
    work = Path(tempfile.mkdtemp(prefix="fyf", dir="/tmp"))
    a = b = None
    try:
        disks = {"raw": work / "raw.img", "qcow2": work / "vm.qcow2"}
        for fmt, path in disks.items():
            subprocess.run(["qemu-img", "create", "-q", "-f", fmt, str(path), str(size)],
                           check=True)
        a, b = start_sites(work)
        uris = {}
        for fmt, path in disks.items():
            out = a.ferry("protect", fmt, "--disk", "vda=%s" % path, "--target",
                          b.address).stdout
            uris[fmt] = out.split("\t")[1].strip()
            a.ferry("wait", fmt, "--synced", "--timeout", "300")
        results: dict = {job: {fmt: [] for fmt in uris} for job in JOBS}
        for rep in range(reps):
            for job, jargs in JOBS.items():
                for fmt, uri in uris.items():
                    for other in uris:  # no backlog of the run before competes for CPU
                        a.ferry("wait", other, "--synced", "--timeout", "600")
                    procs = processes_of(disks[fmt])
                    procs.update({site.proc.pid: "agent " + site.name for site in (a, b)
                                  if site.proc is not None})
                    before = cpu_seconds(list(procs))
                    r = fio(uri, jargs, size, seconds)
                    after = cpu_seconds(list(procs))
                    ops = r["bytes"] / (4096 if "4k" in job else MiB)
                    r["cpu_us_per_op"] = {procs[p]: round((after[p] - before[p]) / ops * 1e6, 1)
                                          for p in after if p in before and ops}
                    results[job][fmt].append(r)
                    print("rep %d %-18s %-6s %9.0f IOPS %8.1f MB/s p99 %7.0f us  CPU us/op %s" % (
                        rep + 1, job, fmt, r["iops"], r["mb_s"], r["lat_p99_us"],
                        ", ".join("%s %.1f" % kv for kv in sorted(r["cpu_us_per_op"].items()))),
                        flush=True)
        identical = {}
        for fmt in disks:
            a.ferry("wait", fmt, "--synced", "--timeout", "600")
            restored = work / ("restored-%s.raw" % fmt)
            b.ferry("restore", fmt, "--disk", "vda", "--to", str(restored))
            # The guest's view through the splitter: the image file itself may lag behind
            # qemu-nbd's cache until the guest flushes (fio does not).
            identical[fmt] = subprocess.run(
                ["qemu-img", "compare", "-q", "-f", "raw", "-F", "raw", str(restored),
                 uris[fmt]]).returncode == 0
        figures = []
        print()
        for job in JOBS:
            key = KEY[job]
            med = {fmt: statistics.median(r[key] for r in results[job][fmt]) for fmt in uris}
            ratio = statistics.median(q[key] / r[key] for q, r in
                                      zip(results[job]["qcow2"], results[job]["raw"]))
            unit = "IOPS" if key == "iops" else "MB/s"
            figures.append(report.figure(
                "qcow2 source, %s %s, replicating" % (job, unit),
                "%.0f %s" % (med["qcow2"], unit), "raw source %.0f %s" % (med["raw"], unit),
                ratio, ">= 0.7 of the raw source", ratio >= 0.7,
                qcow2=med["qcow2"], raw=med["raw"]))
        print("replicas equal their sources: %s" % identical)
        report.print_figures(figures)
        report.write("formats", args.out, {"seconds": seconds, "reps": reps,
                                           "disk_bytes": size, "jobs": JOBS},
                     figures, runs=results, replicas_identical=identical)
        return 0 if all(identical.values()) else 1
    finally:
        for site in (a, b):
            if site is not None:
                site.stop()
                site.kill_splitters()
                site.kill_exports()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
