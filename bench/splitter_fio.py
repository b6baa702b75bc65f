"""What the splitter costs a writer: fio through Ferry (replication on) next to nbdkit.

    python bench/splitter_fio.py [--quick] [--seconds N] [--reps N] [--out FILE]

Three NBD servers on this machine, each given the same fio jobs (``--ioengine=nbd``),
interleaved, several repetitions, median reported:

- ``file``: nbdkit's C file plugin on a raw image (the baseline);
- ``noop-python``: a Python plugin that does nothing (the interpreter's ceiling);
- ``ferry``: Ferry's splitter on a raw image protected to a second agent on this machine,
  replication running (two agents, loopback), after the initial sync.

Jobs: 4 KiB random writes at queue depth 16, and 64 KiB and 1 MiB sequential writes at queue
depth 4 (``--jobs`` picks some). Each figure is compared with ``file`` of the same repetition:
the median of those ratios is what to read on a shared machine.
At the end the replica is checked against the source. Prints a table; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.lab.sites import Site

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
    w = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]["write"]
    return {"iops": w["iops"], "mb_s": w["bw_bytes"] / 1e6,
            "lat_p50_us": w["clat_ns"]["percentile"]["50.000000"] / 1000,
            "lat_p99_us": w["clat_ns"]["percentile"]["99.000000"] / 1000}


def nbdkit(work: Path, name: str, *args: str) -> tuple:
    sock, pid = work / (name + ".sock"), work / (name + ".pid")
    subprocess.run(["nbdkit", "--unix", str(sock), "--pidfile", str(pid), *args], check=True)
    return "nbd+unix:///?socket=%s" % sock, pid


def versions() -> dict:
    def first_line(cmd: list) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            return "?"
    return {"nbdkit": first_line(["nbdkit", "--version"]),
            "fio": first_line(["fio", "--version"]),
            "python": platform.python_version(), "kernel": platform.release(),
            "cpus": os.cpu_count(), "machine": platform.machine()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="short runs, one repetition")
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--jobs", nargs="*", choices=sorted(JOBS), default=None)
    ap.add_argument("--out", default=str(HERE / "results" / "splitter_fio.json"))
    args = ap.parse_args()
    seconds = args.seconds or (4 if args.quick else 10)
    reps = args.reps or (1 if args.quick else 3)
    jobs = {j: JOBS[j] for j in (args.jobs or JOBS)}
    work = Path(tempfile.mkdtemp(prefix="fyb", dir="/tmp"))
    pids = []
    a, b = Site("A", work), Site("B", work)
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
        b.start()
        a.start()
        out = a.ferry("protect", "bench", "--disk", "vda=%s" % images["ferry"], "--target",
                      b.address).stdout
        uris["ferry"] = out.split("\t")[1].strip()
        a.ferry("wait", "bench", "--synced", "--timeout", "300")
        results: dict = {job: {srv: [] for srv in uris} for job in jobs}
        for rep in range(reps):
            for job, jargs in jobs.items():
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
        print("%-18s %-12s %10s %10s %10s %10s %8s %8s" % (
            "job", "server", "IOPS", "MB/s", "p50 us", "p99 us", "vs file", "vs noop"))
        ratios: dict = {}
        for job in jobs:
            summary[job] = {}
            ratios[job] = {}
            for srv in uris:
                med = {k: statistics.median(r[k] for r in results[job][srv])
                       for k in results[job][srv][0]}
                summary[job][srv] = med
                # Each repetition against the baselines of the same repetition, then the
                # median: what the others on a shared machine did weighs least that way.
                ratios[job][srv] = {
                    "vs_" + b: statistics.median(
                        r["iops"] / bl["iops"]
                        for r, bl in zip(results[job][srv], results[job][base]))
                    for b, base in (("file", "file"), ("noop", "noop-python"))}
            for srv, med in summary[job].items():
                print("%-18s %-12s %10.0f %10.1f %10.0f %10.0f %7.0f%% %7.0f%%" % (
                    job, srv, med["iops"], med["mb_s"], med["lat_p50_us"], med["lat_p99_us"],
                    100 * ratios[job][srv]["vs_file"], 100 * ratios[job][srv]["vs_noop"]))
        print()
        print("replication drained %.1f s after the last job; replica identical: %s"
              % (drain, identical))
        report = {"benchmark": "splitter_fio", "date": time.strftime("%F %T %z"),
                  "seconds": seconds, "reps": reps, "disk_bytes": SIZE, "versions": versions(),
                  "jobs": jobs, "median": summary, "median_ratio": ratios,
                  "runs": results,
                  "drain_seconds": drain, "replica_identical": identical}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print("wrote %s" % args.out)
        return 0 if identical else 1
    finally:
        for pid in pids:
            try:
                os.kill(int(pid.read_text()), 15)
            except (OSError, ValueError):
                pass
        for site in (a, b):
            site.stop()
            site.kill_splitters()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
