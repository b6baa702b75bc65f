"""The change log's cost per guest write, without nbdkit: begin + commit, with the link's
take and the target's ack every 64 writes (as when replication keeps up), without and with
an activity log (the splitter always has one; writes spread over 800 MiB, so the log's
slots stay warm and no write pays its fdatasync).

    python bench/changelog_micro.py [--writes N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

from formats import localwire as lw
from nbd_plugin.activity import ActivityLog
from nbd_plugin.changelog import ChangeLog


def run(writes: int, activity: bool = False) -> float:
    tmp = tempfile.mkdtemp()
    try:
        al = ActivityLog(os.path.join(tmp, "al"), slots=256) if activity else None
        log = ChangeLog(1, 1 << 40, activity=al)
        data = bytes(4096)
        offsets = [(i * 7919 % 204800) * 4096 for i in range(writes)]
        for off in offsets[:204800]:  # every extent in the log before the clock starts
            log.commit(log.begin(off, 4096), lw.KIND_WRITE, off, 4096, data, 0)
        log.take(1 << 40, 0)
        log.ack(1, log.counters()["next_seq"] - 1)
        base = log.counters()["next_seq"] - 1
        t = time.perf_counter()
        for i, off in enumerate(offsets):
            token = log.begin(off, 4096)
            log.commit(token, lw.KIND_WRITE, off, 4096, data, 0)
            if i % 64 == 63:
                log.take(1 << 30, 0)
                log.ack(1, base + i + 1)
        return (time.perf_counter() - t) / writes * 1e6
    finally:
        shutil.rmtree(tmp)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=200_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = sorted(run(args.writes) for _ in range(5))
    print("change log: %.2f us per 4 KiB write (median of 5; min %.2f, max %.2f)"
          % (runs[2], runs[0], runs[-1]))
    with_al = sorted(run(args.writes, activity=True) for _ in range(5))
    print("with an activity log: %.2f us per 4 KiB write (median of 5; min %.2f, max %.2f)"
          % (with_al[2], with_al[0], with_al[-1]))
    figures = [report.figure("change log cost per 4 KiB write (no nbdkit)",
                             "%.2f us (%.2f us with the activity log)" % (runs[2], with_al[2]),
                             us_per_write=runs[2], us_per_write_activity=with_al[2])]
    report.write("changelog_micro", args.out, {"writes": args.writes, "reps": 5}, figures,
                 us_per_write=runs[2], runs=runs, us_per_write_activity=with_al[2],
                 runs_activity=with_al)
    return 0


if __name__ == "__main__":
    sys.exit(main())
