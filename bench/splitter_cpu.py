"""Where a splitter's writes spend CPU: one fio job through Ferry with replication running,
and the CPU each process used meanwhile.

    python bench/splitter_cpu.py [--job NAME] [--seconds N] [--reps N]
                                 [--py-spy DIR] [--perf DIR]

Starts two agents on this machine (``lab.sites``), protects a 1 GiB raw image, waits
for the initial sync, then runs the fio job (``--ioengine=nbd``) ``--reps`` times and prints,
per run, IOPS, MB/s and the CPU (user + system, in % of one core) of the splitter's nbdkit
and of both agents, fio's own, and how busy the whole machine was (other work included).
CPU per unit of work varies less than throughput on a shared machine:
use it to compare two versions of the splitter, run after run.

``--py-spy DIR`` records each process with py-spy (``--gil``: samples that hold the GIL,
raw format, one file per process); ``--perf DIR`` records the splitter with ``perf record
-g``. Neither tool is a dependency of Ferry: install them to use these options.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.sites import Site

JOBS = {
    "randwrite-4k-qd16": ["--rw=randwrite", "--bs=4k", "--iodepth=16"],
    "seqwrite-64k-qd4": ["--rw=write", "--bs=64k", "--iodepth=4"],
    "seqwrite-1m-qd4": ["--rw=write", "--bs=1M", "--iodepth=4"],
}


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_busy() -> tuple:
    """(busy, total) jiffies of all CPUs, from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return sum(v) - idle, sum(v)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--job", choices=sorted(JOBS), default="randwrite-4k-qd16")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--py-spy", dest="py_spy", default=None)
    ap.add_argument("--perf", default=None)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="fyc", dir="/tmp"))
    a, b = Site("A", work), Site("B", work)
    try:
        img = work / "vda.img"
        with open(img, "wb") as f:
            f.truncate(1 << 30)
        b.start()
        a.start()
        out = a.ferry("protect", "bench", "--disk", "vda=%s" % img, "--target",
                      b.address).stdout
        uri = out.split("\t")[1].strip()
        a.ferry("wait", "bench", "--synced", "--timeout", "300")
        assert a.proc is not None and b.proc is not None
        pids = {"splitter": a.splitter_pids()[0], "agent-A": a.proc.pid,
                "agent-B": b.proc.pid}
        for rep in range(args.reps):
            tools = []
            if args.py_spy:
                Path(args.py_spy).mkdir(parents=True, exist_ok=True)
                for name, pid in pids.items():
                    tools.append(subprocess.Popen(
                        [shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
                         "record", "--gil", "--threads", "--nonblocking", "-r", "200",
                         "-f", "raw", "-d", str(args.seconds), "-p", str(pid),
                         "-o", str(Path(args.py_spy) / ("%s-%d.txt" % (name, rep + 1)))],
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            if args.perf:
                Path(args.perf).mkdir(parents=True, exist_ok=True)
                tools.append(subprocess.Popen(
                    ["perf", "record", "-F", "499", "-g", "-p", str(pids["splitter"]), "-o",
                     str(Path(args.perf) / ("splitter-%d.data" % (rep + 1))), "--", "sleep",
                     str(max(1, args.seconds - 1))],
                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            os.sync()
            before = {k: cpu_seconds(p) for k, p in pids.items()}
            busy0 = machine_busy()
            t = time.monotonic()
            proc = subprocess.run(
                ["fio", "--name=cpu", "--ioengine=nbd", "--uri=" + uri, "--size=1G",
                 "--runtime=%d" % args.seconds, "--time_based", "--output-format=json",
                 *JOBS[args.job]], capture_output=True, text=True, check=True)
            elapsed = time.monotonic() - t
            after = {k: cpu_seconds(p) for k, p in pids.items()}
            busy1 = machine_busy()
            job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
            w = job["write"]
            ncpu = os.cpu_count() or 1
            print("rep %d %s: %.0f IOPS %.1f MB/s; CPU %s, fio %.0f%%; machine %.0f%% of %d"
                  "%% busy" % (
                      rep + 1, args.job, w["iops"], w["bw_bytes"] / 1e6,
                      ", ".join("%s %.0f%%" % (k, 100 * (after[k] - before[k]) / elapsed)
                                for k in pids),
                      job["usr_cpu"] + job["sys_cpu"],
                      100 * ncpu * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1]),
                      100 * ncpu), flush=True)
            for tool in tools:
                tool.wait()
        a.ferry("wait", "bench", "--synced", "--timeout", "600")
        return 0
    finally:
        for site in (a, b):
            site.stop()
            site.kill_splitters()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
