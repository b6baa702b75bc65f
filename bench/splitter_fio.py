"""What the splitter costs a writer: fio through Ferry (replication on) next to nbdkit.

    python bench/splitter_fio.py [--quick] [--seconds N] [--reps N] [--out FILE]

Three NBD servers on this machine, each given the same fio jobs (``--ioengine=nbd``),
interleaved, several repetitions, median reported:

- ``file``: nbdkit's C file plugin on a raw image (the baseline);
- ``noop-python``: a Python plugin that does nothing (the interpreter's ceiling);
- ``ferry``: Ferry's splitter on a raw image protected to a second agent on this machine,
  replication running (two agents, loopback), after the initial sync.

Jobs: 4 KiB random writes at queue depth 16, 64 KiB and 1 MiB sequential writes at queue
depth 4; each reports IOPS, MB/s and fio's completion latency p50/p99 (clat percentiles).
At the end the replica is checked against the source. Prints a table and the figures of
issue 6 against their goals; writes JSON and a PNG (bars, relative to ``file``).
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

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import start_sites

MiB = 1024 * 1024
SIZE = 1024 * MiB
HERE = Path(__file__).resolve().parent
JOBS = {
    "randwrite-4k-qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "seqwrite-64k-qd4": ["--rw=write", "--bs=64k", "--iodepth=4"],
    "seqwrite-1m-qd4": ["--rw=write", "--bs=1M", "--iodepth=4"],
}


def fio(uri: str, job: list, seconds: int) -> dict:
    # Start every run with no dirty page cache left by the one before: otherwise the
    # kernel's writeback throttling lands on whichever server writes next.
    os.sync()
    proc = subprocess.run(
        ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--size=%d" % SIZE,
         "--runtime=%d" % seconds, "--time_based", "--output-format=json", *job],
        capture_output=True, text=True, check=True)
    r = report.fio_write(report.fio_json(proc.stdout)["jobs"][0])
    del r["bytes"]
    return r


def nbdkit(work: Path, name: str, *args: str) -> tuple:
    sock, pid = work / (name + ".sock"), work / (name + ".pid")
    subprocess.run(["nbdkit", "--unix", str(sock), "--pidfile", str(pid), *args], check=True)
    return "nbd+unix:///?socket=%s" % sock, pid


def rep_ratio(results: dict, job: str, key: str, base: str) -> float:
    """Ferry over ``base`` for ``key``, repetition by repetition (both ran side by side,
    under the same load), the median of those ratios."""
    runs = results[job]
    return statistics.median(f[key] / b[key] for f, b in zip(runs["ferry"], runs[base]))


def figures_of(summary: dict, results: dict) -> list:
    """The figures of issue 6 this benchmark measures, against their goals. Each ratio is
    the median of the repetitions' ratios."""
    out = []
    r = summary["randwrite-4k-qd16"]
    ratio = rep_ratio(results, "randwrite-4k-qd16", "iops", "noop-python")
    out.append(report.figure(
        "4 KiB random-write IOPS, QD 16, replicating", "%.0f IOPS" % r["ferry"]["iops"],
        "no-op Python plugin %.0f IOPS (nbdkit file %.0f)" % (r["noop-python"]["iops"],
                                                             r["file"]["iops"]),
        ratio, ">= 80% of the no-op Python plugin", ratio >= 0.8,
        ferry_iops=r["ferry"]["iops"], noop_iops=r["noop-python"]["iops"],
        file_iops=r["file"]["iops"]))
    for job, label in (("seqwrite-64k-qd4", "64 KiB"), ("seqwrite-1m-qd4", "1 MiB")):
        r = summary[job]
        ratio = rep_ratio(results, job, "mb_s", "file")
        out.append(report.figure(
            "%s sequential write MB/s, QD 4, replicating" % label,
            "%.0f MB/s" % r["ferry"]["mb_s"], "nbdkit file %.0f MB/s" % r["file"]["mb_s"],
            ratio, ">= 90% of nbdkit file", ratio >= 0.9,
            ferry_mb_s=r["ferry"]["mb_s"], file_mb_s=r["file"]["mb_s"]))
    for job in JOBS:
        r = summary[job]
        ratio = rep_ratio(results, job, "lat_p99_us", "file")
        out.append(report.figure(
            "write latency p50/p99, %s" % job,
            "%.0f / %.0f us" % (r["ferry"]["lat_p50_us"], r["ferry"]["lat_p99_us"]),
            "nbdkit file %.0f / %.0f us" % (r["file"]["lat_p50_us"], r["file"]["lat_p99_us"]),
            ratio, "p99 <= 1.2x nbdkit file", ratio <= 1.2,
            ferry_p99_us=r["ferry"]["lat_p99_us"], file_p99_us=r["file"]["lat_p99_us"]))
    return out


def draw(summary: dict):
    def f(plt) -> None:
        _fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        jobs = list(summary)
        servers = list(summary[jobs[0]])
        width = 0.8 / len(servers)
        for i, srv in enumerate(servers):
            xs = [j + i * width for j in range(len(jobs))]
            key = ["iops" if job.startswith("randwrite") else "mb_s" for job in jobs]
            ax1.bar(xs, [summary[job][srv][k] / summary[job]["file"][k]
                         for job, k in zip(jobs, key)], width, label=srv)
            ax2.bar(xs, [summary[job][srv]["lat_p99_us"] / 1000 for job in jobs], width,
                    label=srv)
        for ax in (ax1, ax2):
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(jobs))])
            ax.set_xticklabels(jobs, fontsize=7)
            ax.legend(fontsize=7)
        ax1.set_ylabel("IOPS (4k) or MB/s, relative to nbdkit file")
        ax2.set_ylabel("p99 completion latency, ms (log)")
        ax2.set_yscale("log")
        ax1.set_title("throughput (median of reps)", fontsize=10)
        ax2.set_title("latency p99", fontsize=10)
    return f


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, one repetition")
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    seconds = args.seconds or (3 if args.quick else 10)
    reps = args.reps or (1 if args.quick else 3)
    work = Path(tempfile.mkdtemp(prefix="fyb", dir="/tmp"))
    pids = []
    a = b = None
    try:
        images = {}
        for name in ("file", "ferry"):
            images[name] = work / (name + ".img")
            with open(images[name], "wb") as f:
                f.truncate(SIZE)
        uris = {}
        uris["file"], pid = nbdkit(work, "file", "file", str(images["file"]))
        pids.append(pid)
        uris["noop-python"], pid = nbdkit(work, "noop", "python", str(HERE / "noop_plugin.py"),
                                          "size=%d" % SIZE)
        pids.append(pid)
        a, b = start_sites(work)
        out = a.ferry("protect", "bench", "--disk", "vda=%s" % images["ferry"], "--target",
                      b.address).stdout
        uris["ferry"] = out.split("\t")[1].strip()
        a.ferry("wait", "bench", "--synced", "--timeout", "300")
        results: dict = {job: {srv: [] for srv in uris} for job in JOBS}
        for rep in range(reps):
            for job, jargs in JOBS.items():
                for srv, uri in uris.items():
                    r = fio(uri, jargs, seconds)
                    results[job][srv].append(r)
                    print("rep %d %-18s %-12s %9.0f IOPS %8.1f MB/s p99 %7.0f us" % (
                        rep + 1, job, srv, r["iops"], r["mb_s"], r["lat_p99_us"]),
                        flush=True)
        t = time.monotonic()
        a.ferry("wait", "bench", "--synced", "--timeout", "600")
        drain = time.monotonic() - t
        restored = work / "restored.img"
        b.ferry("restore", "bench", "--disk", "vda", "--to", str(restored))
        identical = subprocess.run(["cmp", "-s", str(images["ferry"]), str(restored)]
                                   ).returncode == 0
        summary: dict = {}
        print()
        print("%-18s %-12s %10s %10s %10s %10s %8s" % ("job", "server", "IOPS", "MB/s",
                                                       "p50 us", "p99 us", "vs file"))
        for job in JOBS:
            summary[job] = {}
            for srv in uris:
                med = {k: statistics.median(r[k] for r in results[job][srv])
                       for k in results[job][srv][0]}
                summary[job][srv] = med
            base = summary[job]["file"]["iops"]
            for srv, med in summary[job].items():
                print("%-18s %-12s %10.0f %10.1f %10.0f %10.0f %7.0f%%" % (
                    job, srv, med["iops"], med["mb_s"], med["lat_p50_us"], med["lat_p99_us"],
                    100 * med["iops"] / base))
        print()
        print("replication drained %.1f s after the last job; replica identical: %s"
              % (drain, identical))
        figures = figures_of(summary, results)
        report.print_figures(figures)
        png = report.plot("splitter_fio", draw(summary))
        report.write("splitter_fio", args.out, {"seconds": seconds, "reps": reps,
                                                "disk_bytes": SIZE, "jobs": JOBS},
                     figures, median=summary, runs=results, drain_seconds=drain,
                     replica_identical=identical, plot=str(png) if png else None)
        return 0 if identical else 1
    finally:
        for pid in pids:
            try:
                os.kill(int(pid.read_text()), 15)
            except (OSError, ValueError):
                pass
        for site in (a, b):
            if site is not None:
                site.stop()
                site.kill_splitters()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
