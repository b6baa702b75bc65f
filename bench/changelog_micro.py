"""The change log's cost per guest write, without nbdkit: begin + commit, with the link's
take and the target's ack every 64 writes (as when replication keeps up).

    python bench/changelog_micro.py [--writes N]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report

from nbd_plugin import localwire as lw
from nbd_plugin.changelog import ChangeLog


def run(writes: int) -> float:
    log = ChangeLog(1, 1 << 40)
    data = bytes(4096)
    t = time.perf_counter()
    for i in range(writes):
        token = log.begin(i * 4096, 4096)
        log.commit(token, lw.KIND_WRITE, i * 4096, 4096, data, 0)
        if i % 64 == 63:
            log.take(1 << 30, 0)
            log.ack(1, i + 1)
    return (time.perf_counter() - t) / writes * 1e6


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--writes", type=int, default=200_000)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    runs = sorted(run(args.writes) for _ in range(5))
    print("change log: %.2f us per 4 KiB write (median of 5; min %.2f, max %.2f)"
          % (runs[2], runs[0], runs[-1]))
    figures = [report.figure("change log cost per 4 KiB write (no nbdkit)",
                             "%.2f us" % runs[2], us_per_write=runs[2])]
    report.write("changelog_micro", args.out, {"writes": args.writes, "reps": 5}, figures,
                 us_per_write=runs[2], runs=runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
