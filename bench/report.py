"""What every benchmark records: the machine and versions, medians and percentiles, the
figures of issue 6 against their goals, the JSON file, and a PNG plot where a curve says more.

A *figure* is one line of the summary table (``bench/run.py`` writes it to
``bench/results/summary.md``)::

    {"figure": "4 KiB random-write IOPS, QD 16", "ferry": "23,994 IOPS",
     "baseline": "34,828 IOPS (no-op Python plugin)", "ratio": 0.69,
     "goal": ">= 80% of the no-op Python plugin", "met": false}

``met`` is None where the figure has no goal. Plots need matplotlib (Debian's
``python3-matplotlib``, installed by ``make bench``); without it a benchmark still prints
and writes its JSON, and says that it drew no plot.
"""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"


def _first_line(cmd: List[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
        return (out.stdout or out.stderr).splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def _git_head() -> str:
    out = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    # Paths from the checkout's top (with -C bench/ they named bench/agent and the like,
    # which never change: a run on changed code was reported as the commit).
    dirty = subprocess.run(["git", "-C", str(HERE.parent), "status", "--porcelain", "--",
                            "agent", "nbd_plugin", "formats", "bench"],
                           capture_output=True, text=True).stdout
    return out.stdout.strip() + ("+changes" if dirty.strip() else "")


def machine() -> Dict[str, Any]:
    """The machine, the versions of every tool a benchmark uses, and how loaded it was."""
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(f.readline().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    try:
        zstd = __import__("zstandard").__version__
    except ImportError:
        zstd = "?"
    try:
        trio = __import__("trio").__version__
    except ImportError:
        trio = "?"
    return {"host": platform.node(), "kernel": platform.release(),
            "machine": platform.machine(), "cpus": os.cpu_count(),
            "memory_gib": round(mem_kib / 2**20, 1), "loadavg": list(os.getloadavg()),
            "python": platform.python_version(), "nbdkit": _first_line(["nbdkit", "--version"]),
            "fio": _first_line(["fio", "--version"]),
            "nbdcopy": _first_line(["nbdcopy", "--version"]),
            "zstandard": zstd, "trio": trio, "ferry": _git_head()}


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def percentile(xs: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; NaN for no samples."""
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return float(s[k])


def figure(name: str, ferry: str, baseline: str = "", ratio: Optional[float] = None,
           goal: str = "", met: Optional[bool] = None, **numbers: Any) -> Dict[str, Any]:
    """One line of the summary: what was measured, against what, and whether it meets its
    goal. ``numbers`` keeps the raw values beside the text."""
    return {"figure": name, "ferry": ferry, "baseline": baseline,
            "ratio": None if ratio is None else round(ratio, 4), "goal": goal, "met": met,
            "numbers": numbers}


def print_figures(figures: List[Dict[str, Any]]) -> None:
    print()
    for f in figures:
        met = {True: "MET", False: "NOT MET", None: "-"}[f["met"]]
        print("%-52s %s" % (f["figure"], f["ferry"]))
        if f["baseline"]:
            print("%-52s   vs %s%s" % ("", f["baseline"], "  (ratio %.2f)" % f["ratio"]
                                       if f["ratio"] is not None else ""))
        if f["goal"]:
            print("%-52s   goal %s: %s" % ("", f["goal"], met))


def write(name: str, out: Optional[str], params: Dict[str, Any], figures: List[Dict[str, Any]],
          **data: Any) -> Path:
    """Write the benchmark's JSON: parameters, machine, figures and whatever else it kept."""
    path = Path(out) if out else RESULTS / (name + ".json")
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {"benchmark": name, "date": time.strftime("%F %T %z"),
              "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
              "params": params, "machine": machine(), "figures": figures, **data}
    path.write_text(json.dumps(report, indent=1, default=str))
    print("wrote %s" % path)
    return path


def plot(name: str, draw: Callable[[Any], None], out_dir: Optional[Path] = None
         ) -> Optional[Path]:
    """Draw a PNG with ``draw(pyplot)``; None (and a note) when matplotlib is missing."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no plot %s.png: matplotlib is not installed (apt-get install python3-matplotlib)"
              % name)
        return None
    path = (out_dir or RESULTS) / (name + ".png")
    path.parent.mkdir(parents=True, exist_ok=True)
    plt.figure(figsize=(8, 4.5), dpi=100)
    try:
        draw(plt)
        plt.tight_layout()
        plt.savefig(path)
    finally:
        plt.close("all")
    print("wrote %s" % path)
    return path


def rss_kib(pid: int) -> int:
    """A process's resident set (VmRSS), KiB; 0 if it is gone."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a process (all its threads) has used, seconds."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def io_counters(pid: int) -> Dict[str, int]:
    """/proc/PID/io of a process (all its threads): write_bytes, wchar, ..."""
    out: Dict[str, int] = {}
    try:
        with open("/proc/%d/io" % pid) as f:
            for line in f:
                key, _, value = line.partition(":")
                out[key.strip()] = int(value)
    except (OSError, ValueError):
        pass
    return out


def fio_write(result: Dict[str, Any]) -> Dict[str, float]:
    """The write side of one fio job's JSON result: IOPS, MB/s, clat p50/p99 (us)."""
    w = result["write"]
    pct = w["clat_ns"].get("percentile", {})
    return {"iops": w["iops"], "mb_s": w["bw_bytes"] / 1e6, "bytes": w["io_bytes"],
            "lat_p50_us": pct.get("50.000000", 0) / 1000,
            "lat_p99_us": pct.get("99.000000", 0) / 1000}


def fio_json(stdout: str) -> Dict[str, Any]:
    """fio's JSON output (it may print warnings before it)."""
    result: Dict[str, Any] = json.loads(stdout[stdout.index("{"):])
    return result
