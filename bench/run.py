"""Run Ferry's benchmarks one after the other: ``make bench`` (or ``make bench-quick``).

    python bench/run.py [--quick] [--only NAME ...]

Each benchmark is a program in this folder that prints its own table and writes JSON to
bench/results/; this runner records the machine, runs them, and prints where each result
went and whether it succeeded. ``--quick`` passes ``--quick`` on (short runs, one
repetition: the whole suite in a few minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHMARKS = {
    "changelog_micro": ["changelog_micro.py"],
    "splitter_fio": ["splitter_fio.py"],
    "initial_sync": ["initial_sync.py"],
    "pit_view": ["pit_view.py"],
    "tls_throughput": ["tls_throughput.py"],
    "preseed_sync": ["preseed_sync.py"],
}
QUICK_FLAGS = {"changelog_micro": ["--writes", "50000"],
               "pit_view": ["--records", "100000", "--reads", "1000"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    results = HERE / "results"
    results.mkdir(exist_ok=True)
    machine = {"date": time.strftime("%F %T %z"), "host": platform.node(),
               "kernel": platform.release(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "quick": args.quick}
    (results / "machine.json").write_text(json.dumps(machine, indent=1))
    failed = []
    start = time.monotonic()
    for name in names:
        cmd = [sys.executable, str(HERE / BENCHMARKS[name][0])]
        if args.quick:
            cmd += QUICK_FLAGS.get(name, ["--quick"])
        print("=== %s: %s" % (name, " ".join(cmd[1:])), flush=True)
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        print(flush=True)
    print("%d benchmarks in %.0f s; results in %s%s" % (
        len(names), time.monotonic() - start, results,
        "; FAILED: " + ", ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
