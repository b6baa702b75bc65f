"""``make fuzz``: the nightly-style fuzz run (``fuzzing.py`` has the targets).

    python tests/fuzz/run.py [--inputs N] [--seed S] [--target NAME ...]

``--inputs`` (or ``FUZZ_INPUTS``; default 1,000,000) is the total, shared out over the
targets. Prints inputs, rate and crashes per target and the peak RSS; crashing inputs are
kept in ``tests/fuzz/crashes/`` (add them to ``seeds/`` once fixed: ``test_fuzz.py`` runs
every seed in ``make test``). Exits 1 when anything crashed.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import fuzzing


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--inputs", type=int, default=int(os.environ.get("FUZZ_INPUTS", 1_000_000)))
    p.add_argument("--seed", type=int, default=int(os.environ.get("FUZZ_SEED", 1)))
    p.add_argument("--target", action="append", choices=sorted(fuzzing.TARGETS))
    args = p.parse_args()
    targets = args.target or sorted(fuzzing.TARGETS)
    share = max(1, args.inputs // len(targets))
    total, crashed = 0, []
    start = time.monotonic()
    print("fuzz: %d inputs over %s, seed %d (%s)" % (
        share * len(targets), ", ".join(targets), args.seed,
        time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), flush=True)
    for target in targets:
        t = time.monotonic()
        n, crashes = fuzzing.run(target, share, args.seed)
        dt = time.monotonic() - t
        total += n
        crashed += crashes
        print("  %-10s %9d inputs  %7.0f/s  %d crash(es)" % (target, n, n / dt, len(crashes)),
              flush=True)
        for c in crashes[:10]:
            print("    " + c)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print("fuzz: %d inputs in %.0f s, %d crash(es), peak RSS %.1f MiB" % (
        total, time.monotonic() - start, len(crashed), rss / 1024))
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
