#!/usr/bin/env python3
"""Does the splitter stay fast when its client reconnects again and again (a VM's NBD
client after every link drop, a backup tool, fio runs in a benchmark)?

    python bench/reconnects.py [--connections 30] [--seconds 1] [--quick] [--out FILE]

One splitter, the group paused (nothing shipped: the splitter's own cost), then fio
(4 KiB random writes, QD 16) ``--connections`` times, each a new NBD connection that nbdkit
serves on 16 new worker threads. Prints each run's IOPS, and the median of the last five
against the median of runs 6-10: about 1.0 when ended worker threads give back their Python
thread states (nbd_plugin/threadstate.py), lower when new threads fall back to the slow
``PyGILState`` path once ``MAX_PINNED`` states are kept.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import Pair


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--connections", type=int, default=30)
    ap.add_argument("--seconds", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="20 connections")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.connections = 20
    if args.connections < 15:
        ap.error("--connections must be at least 15 (runs 6-10 against the last five)")
    load, began = os.getloadavg(), time.gmtime()
    iops = []
    with Pair("frc") as pair:
        a, b = pair.a, pair.b
        image = pair.image("d", 1 << 30)
        out = a.ferry("protect", "g", "--disk", "vda=%s" % image, "--target",
                      b.address).stdout
        uri = out.split("\t")[1].strip()
        a.ferry("wait", "g", "--synced", "--timeout", "300")
        a.ferry("pause", "g")
        for i in range(args.connections):
            os.sync()  # each run starts with no dirty page cache left by the one before
            cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--size=256M",
                   "--rw=randwrite", "--bs=4k", "--iodepth=16", "--runtime=%d" % args.seconds,
                   "--time_based", "--output-format=json"]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
            iops.append(report.fio_json(proc.stdout)["jobs"][0]["write"]["iops"])
            print("connection %2d  %6.0f IOPS" % (i + 1, iops[-1]), flush=True)
        a.ferry("unprotect", "g")
    early, late = statistics.median(iops[5:10]), statistics.median(iops[-5:])
    print("\nreconnects: %s UTC, Ferry %s, load average at the start %.2f %.2f %.2f"
          % (time.strftime("%F %H:%M", began), report._git_head(), *load))
    print("runs 6-10: median %.0f IOPS; last five: median %.0f IOPS; ratio %.2f"
          % (early, late, late / early))
    figures = [report.figure(
        "4 KiB random-write IOPS (QD 16, paused) after %d reconnects" % args.connections,
        "%.0f IOPS (median of the last five connections)" % late,
        "%.0f IOPS (connections 6-10)" % early, late / early, ">= 0.8 of connections 6-10",
        late / early >= 0.8)]
    report.print_figures(figures)
    report.write("reconnects", args.out, vars(args), figures, loadavg_start=load, iops=iops,
                 ratio=late / early)


if __name__ == "__main__":
    main()
