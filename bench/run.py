"""Run Ferry's benchmarks one after the other: ``make bench`` (or ``make bench-quick``).

    python bench/run.py [--quick] [--only NAME ...]

Each benchmark is a program in this folder that prints its own table and writes JSON (with
the machine, the versions and its parameters) and, where a curve says more, a PNG to
bench/results/. This runner records the machine, runs them, and writes
bench/results/summary.md: every figure of issue 6 with its baseline from the same run, its
goal, and whether it is met (with ``--only``, the other benchmarks' latest results are
listed too, marked as from an earlier run). ``--quick`` passes each benchmark its quick
flags (short runs, one repetition: the whole suite in under 5 minutes); the full run
repeats every measurement and reports medians.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

import report  # bench/ is on the path: this file runs as a script from it

HERE = Path(__file__).resolve().parent
BENCHMARKS: Dict[str, List[str]] = {
    "changelog_micro": ["changelog_micro.py"],
    "splitter_fio": ["splitter_fio.py"],
    "rpo": ["rpo.py"],
    "shipping": ["shipping.py"],
    "initial_sync": ["initial_sync.py"],
    "pit_view": ["pit_view.py"],
    "footprint": ["footprint.py"],
    "tls_throughput": ["tls_throughput.py"],
    "preseed_sync": ["preseed_sync.py"],
    "formats": ["disk_formats.py"],
    "control_plane": ["control_plane.py"],
    "target_write": ["target_write.py"],
    "splitter_threads": ["splitter_threads.py"],
    "reconnects": ["reconnects.py"],
}
QUICK_FLAGS = {"changelog_micro": ["--writes", "50000"],
               "pit_view": ["--records", "100000", "--reads", "1000", "--reps", "2"]}


def summary(names: List[str], failed: List[str], machine: Dict[str, Any], quick: bool,
            seconds: float) -> str:
    lines = ["# Ferry benchmarks: summary", "",
             "%s run of %s, %.0f s, on %s: %s CPUs, %s GiB, Linux %s, load average at the "
             "start %s." % ("Quick (`make bench-quick`)" if quick else "Full (`make bench`)",
                            time.strftime("%F %H:%M"), seconds, machine["host"],
                            machine["cpus"], machine["memory_gib"], machine["kernel"],
                            " ".join("%.1f" % x for x in machine["loadavg"])),
             "Python %s, nbdkit %s, %s, nbdcopy %s, zstandard %s, trio %s; Ferry %s." % (
                 machine["python"], machine["nbdkit"].replace("nbdkit ", ""), machine["fio"],
                 machine["nbdcopy"].replace("nbdcopy ", ""), machine["zstandard"],
                 machine["trio"], machine["ferry"]),
             "Each figure is measured against its baseline in the same run%s." % (
                 "" if quick else ", repeated, the median reported"),
             "",
             "| figure | Ferry | baseline, same run | ratio | goal | met | benchmark |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    notes = []
    for name in BENCHMARKS:
        path = report.RESULTS / (name + ".json")
        if name not in names and not path.exists():
            continue
        if name in failed:
            notes.append("- `%s` FAILED in this run (see its output)." % name)
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            notes.append("- `%s` wrote no JSON." % name)
            continue
        figures = data.get("figures")
        if not figures:
            notes.append("- `%s`: no figures in its JSON (%s)." % (name, path.name))
            continue
        when = "" if name in names else " (earlier run, %s)" % data.get("date", "?")[:16]
        for f in figures:
            met = {True: "yes", False: "**no**", None: "-"}[f.get("met")]
            ratio = "" if f.get("ratio") is None else "%.2f" % f["ratio"]
            lines.append("| %s | %s | %s | %s | %s | %s | `%s`%s |" % (
                f["figure"], f["ferry"], f.get("baseline") or "-", ratio,
                f.get("goal") or "-", met, data.get("command", name), when))
        if data.get("plot"):
            notes.append("- `%s`: plot %s" % (name, Path(data["plot"]).name))
    counted = [ln for ln in lines if ln.startswith("| ") and not ln.startswith("| figure")]
    met = sum(1 for ln in counted if "| yes |" in ln)
    unmet = sum(1 for ln in counted if "| **no** |" in ln)
    lines += ["", "%d goals met, %d not met." % (met, unmet)]
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", nargs="*", choices=sorted(BENCHMARKS))
    args = ap.parse_args()
    names = args.only or list(BENCHMARKS)
    report.RESULTS.mkdir(exist_ok=True)
    machine = dict(report.machine(), date=time.strftime("%F %T %z"), quick=args.quick)
    (report.RESULTS / "machine.json").write_text(json.dumps(machine, indent=1))
    failed = []
    start = time.monotonic()
    took = {}
    for name in names:
        cmd = [sys.executable, str(HERE / BENCHMARKS[name][0])]
        if args.quick:
            cmd += QUICK_FLAGS.get(name, ["--quick"])
        print("=== %s: %s" % (name, " ".join(cmd[1:])), flush=True)
        t = time.monotonic()
        if subprocess.run(cmd).returncode != 0:
            failed.append(name)
        took[name] = time.monotonic() - t
        print("(%s: %.0f s)" % (name, took[name]), flush=True)
        print(flush=True)
    seconds = time.monotonic() - start
    text = summary(names, failed, machine, args.quick, seconds)
    (report.RESULTS / "summary.md").write_text(text)
    print(text)
    print("%d benchmarks in %.0f s (%s); results in %s%s" % (
        len(names), seconds, ", ".join("%s %.0f s" % kv for kv in took.items()),
        report.RESULTS, "; FAILED: " + ", ".join(failed) if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
