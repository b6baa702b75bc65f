"""Where a write through Ferry spends its time and CPU: the splitter alone, with replication
pinned apart, and everything on one machine, side by side in one run (issue 12).

    python bench/cost_split.py [--quick] [--seconds N] [--reps N] [--out FILE]
                               [--compare-compression] [--baseline TREE] [--py-spy DIR]
                               [--conditions COND...] [--no-check]

For each fio job (``splitter_fio.JOBS``: 4 KiB random writes QD 16, 64 KiB and 1 MiB
sequential writes QD 4), each repetition runs these conditions one after the other (A B C
A B C ...), so that every condition sees the same load on a shared machine:

- ``file``: nbdkit's C file plugin on a raw image;
- ``noop-parallel``, ``noop-serialized``: the no-op Python plugin (``noop_plugin.py``) in
  nbdkit's parallel thread model, and behind nbdkit's ``noparallel`` filter
  (``serialize=all_requests``, the model nbdkit gives a Python plugin that names none); the
  faster of the two, per repetition, is the interpreter's ceiling;
- ``paused``: Ferry's splitter with the group paused (``ferry pause``: nothing shipped);
- ``pinned``: replication running, site B's agent (and its children) on the last core, fio,
  the splitter and agent A on the others (``taskset``): site B is another host in production;
- ``unpinned``: replication running, nothing pinned;
- ``unpinned-zstd`` (``--compare-compression``): as ``unpinned`` but agent A restarted with
  ``FERRY_COMPRESSION=zstd``, the compression policy before adaptive compression (try zstd
  on every batch), so that the two policies are compared in one run;
- ``unpinned-base`` (``--baseline TREE``): as ``unpinned`` but agent A restarted from
  another Ferry source tree (an older commit): before and after, in one run.

For each run: IOPS, MB/s, and CPU-seconds per GiB written by fio for the splitter's nbdkit
(or the baseline's nbdkit), agent A and agent B, each with its threads and live children
(``/proc/PID/stat``). Replication runs count the CPU until site B holds everything
(``ferry wait --synced``), so what the agents spend draining the backlog is counted too; the
drain time is reported. Prints a markdown table (median and min-max over repetitions) and
writes JSON and markdown to ``bench/results/``.

At the end, after the figures are written, site B restores the disk and it is compared with
the source's image (``--no-check`` skips that: the restore reads the whole journal, minutes
after a full run).

``--py-spy DIR`` (py-spy is not a dependency: install it to use this) then records agent A
and the splitter during one more ``unpinned`` run per job and lists their top frames.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import start_sites
from splitter_fio import JOBS, nbdkit

from lab import sites
from lab.sites import REPO, Site

GiB = 1 << 30
SIZE = GiB
HERE = Path(__file__).resolve().parent
RESTORE_TIMEOUT = 1200
BASELINES = ("file", "noop-parallel", "noop-serialized")
REPLICATING = ("pinned", "unpinned", "unpinned-zstd", "unpinned-base")


# -- processes ------------------------------------------------------------------------------

def _ppids() -> Dict[int, int]:
    out = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open("/proc/%s/stat" % name) as f:
                    out[int(name)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                pass
    return out


def tree(pid: int) -> List[int]:
    """``pid`` and its live descendants."""
    ppids = _ppids()
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(c for c, pp in ppids.items() if pp == p)
    return out


def cpu_snapshot(pid: int) -> Dict[int, float]:
    """CPU seconds (user + system, all threads) of ``pid`` and each live descendant."""
    return {p: report.cpu_seconds(p) for p in tree(pid)}


def cpu_delta(before: Dict[int, float], after: Dict[int, float]) -> float:
    # A child born meanwhile counts whole; one that exited is lost (none do here).
    return sum(max(0.0, s - before.get(p, 0.0)) for p, s in after.items())


def pin(pid: int, cpus: str) -> None:
    """Every thread of ``pid`` and of its descendants onto ``cpus`` (taskset -a)."""
    for p in tree(pid):
        subprocess.run(["taskset", "-a", "-p", "-c", cpus, str(p)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


# -- one run --------------------------------------------------------------------------------

def fio(uri: str, job: List[str], seconds: int, cpus: Optional[str]) -> Dict[str, float]:
    os.sync()  # no dirty page cache left by the run before
    cmd = ["fio", "--name=bench", "--ioengine=nbd", "--uri=" + uri, "--size=%d" % SIZE,
           "--runtime=%d" % seconds, "--time_based", "--output-format=json", *job]
    if cpus:
        cmd = ["taskset", "-c", cpus, *cmd]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return report.fio_write(report.fio_json(proc.stdout)["jobs"][0])


class Bench:
    def __init__(self, work: Path, seconds: int, baseline: Optional[Path] = None) -> None:
        self.work = work
        self.baseline = baseline
        self.seconds = seconds
        self.pidfiles: List[Path] = []
        self.uris: Dict[str, str] = {}
        self.a: Optional[Site] = None
        self.b: Optional[Site] = None
        ncpu = os.cpu_count() or 1
        self.all_cpus = "0-%d" % (ncpu - 1)
        self.b_cpus = str(ncpu - 1)
        self.a_cpus = "0-%d" % max(0, ncpu - 2)

    def start(self) -> None:
        images = {}
        for name in ("file", "ferry"):
            images[name] = self.work / (name + ".img")
            with open(images[name], "wb") as f:
                f.truncate(SIZE)
        plugin = str(HERE / "noop_plugin.py")
        for name, args in (
                ("file", ["file", str(images["file"])]),
                ("noop-parallel", ["python", plugin, "size=%d" % SIZE]),
                ("noop-serialized", ["--filter=noparallel", "python", plugin,
                                     "size=%d" % SIZE, "serialize=all_requests"])):
            self.uris[name], pidfile = nbdkit(self.work, name, *args)
            self.pidfiles.append(pidfile)
        self.a, self.b = start_sites(self.work)
        out = self.a.ferry("protect", "bench", "--disk", "vda=%s" % images["ferry"],
                           "--target", self.b.address).stdout
        self.uris["ferry"] = out.split("\t")[1].strip()
        self.a.ferry("wait", "bench", "--synced", "--timeout", "300")

    def pid_of(self, name: str) -> int:
        return int((self.work / (name + ".pid")).read_text())

    def procs(self, cond: str) -> Dict[str, int]:
        assert self.a is not None and self.b is not None
        assert self.a.proc is not None and self.b.proc is not None
        if cond in BASELINES:
            return {"nbdkit": self.pid_of(cond)}
        return {"nbdkit": self.a.splitter_pids()[0], "agent-A": self.a.proc.pid,
                "agent-B": self.b.proc.pid}

    def restart_a(self, compression: Optional[str] = None, tree: Optional[Path] = None
                  ) -> None:
        """Agent A again, with ``FERRY_COMPRESSION`` set to ``compression`` (None: unset),
        from the Ferry source tree ``tree`` (None: this one). The splitter keeps serving."""
        assert self.a is not None
        self.a.stop()
        if compression is not None:
            os.environ["FERRY_COMPRESSION"] = compression
        if tree is not None:
            sites.REPO = tree  # the agent runs as ``python -m agent.cli`` from REPO
        try:
            self.a.start()
        finally:
            os.environ.pop("FERRY_COMPRESSION", None)
            sites.REPO = REPO
        self.a.ferry("wait", "bench", "--synced", "--timeout", "600")

    def sent(self) -> tuple:
        """Agent A's (frame bytes sent, record bytes shipped: live and resynced)."""
        assert self.a is not None
        g = self.a.status("bench")["groups"]["bench"]
        d = g["disks"]["vda"]
        return int(g["bytes_sent"]), int(d["bytes_shipped"]) + int(d["resync_bytes"])

    def run(self, cond: str, job: List[str]) -> Dict[str, Any]:
        assert self.a is not None and self.b is not None
        if cond == "paused":
            self.a.ferry("pause", "bench")
        if cond == "unpinned-zstd":
            self.restart_a("zstd")
        if cond == "unpinned-base":
            self.restart_a(tree=self.baseline)
        procs = self.procs(cond)
        cpus = None
        if cond == "pinned":
            pin(procs["agent-B"], self.b_cpus)
            for name in ("nbdkit", "agent-A"):
                pin(procs[name], self.a_cpus)
            cpus = self.a_cpus
        sent0 = self.sent() if cond in REPLICATING else (0, 0)
        before = {k: cpu_snapshot(p) for k, p in procs.items()}
        r = fio(self.uris["ferry" if cond in (*REPLICATING, "paused") else cond], job,
                self.seconds, cpus)
        drain = 0.0
        if cond in REPLICATING:
            t = time.monotonic()
            self.a.ferry("wait", "bench", "--synced", "--timeout", "600")
            drain = time.monotonic() - t
        after = {k: cpu_snapshot(p) for k, p in procs.items()}
        if cond in REPLICATING:
            sent1 = self.sent()
            r["wire_bytes"], r["shipped_bytes"] = sent1[0] - sent0[0], sent1[1] - sent0[1]
            shipped = r["shipped_bytes"] / GiB
            r["agent_A_cpu_s_per_gib_shipped"] = cpu_delta(
                before["agent-A"], after["agent-A"]) / shipped if shipped else 0.0
        r["drain_s"] = drain
        gib = r["bytes"] / GiB
        for k in procs:
            r["cpu_s_per_gib_" + k] = cpu_delta(before[k], after[k]) / gib if gib else 0.0
        if cond == "pinned":
            for name in ("nbdkit", "agent-A", "agent-B"):
                pin(procs[name], self.all_cpus)
        if cond == "paused":
            self.a.ferry("resume", "bench")
            self.a.ferry("wait", "bench", "--synced", "--timeout", "600")
        if cond in ("unpinned-zstd", "unpinned-base"):
            self.restart_a()
        return r

    def replica_identical(self) -> Optional[bool]:
        """Site B's restore of the disk, byte for byte the source's image; None when the
        restore did not end within RESTORE_TIMEOUT (it reads the whole journal)."""
        assert self.a is not None and self.b is not None
        self.a.ferry("wait", "bench", "--synced", "--timeout", "600")
        restored = self.work / "restored.img"
        try:
            self.b.ferry("restore", "bench", "--disk", "vda", "--to", str(restored),
                         timeout=RESTORE_TIMEOUT)
        except subprocess.TimeoutExpired:
            return None
        same = subprocess.run(["cmp", "-s", str(self.work / "ferry.img"), str(restored)]
                              ).returncode == 0
        restored.unlink()
        return same

    def stop(self) -> None:
        for pidfile in self.pidfiles:
            try:
                os.kill(int(pidfile.read_text()), 15)
            except (OSError, ValueError):
                pass
        for site in (self.a, self.b):
            if site is not None:
                site.stop()
                site.kill_splitters()


# -- py-spy ---------------------------------------------------------------------------------

def py_spy_exe() -> Optional[str]:
    return shutil.which("py-spy") or next(
        (str(p) for p in [Path(sys.executable).parent / "py-spy"] if p.exists()), None)


def top_frames(raw: Path, n: int = 12) -> Dict[str, Any]:
    """From py-spy's raw (collapsed) output: the frames most samples were in (self) and
    the functions most samples passed through (inclusive), as [frame, share] pairs, over
    the samples that had a Python frame (a thread in C code or asleep outside Python has
    none). ``threads``: how many threads py-spy saw."""
    own: Counter = Counter()
    incl: Counter = Counter()
    threads = set()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        parts = stack.split(";")
        if parts[0].startswith(("thread ", "process ")):
            threads.add(parts.pop(0))
        frames = [short(f) for f in parts]
        if not frames:
            continue
        c = int(count)
        total += c
        own[frames[-1]] += c
        for f in set(frames):
            incl[f] += c
    return {"samples": total, "threads": len(threads),
            "self": [[f, c / total] for f, c in own.most_common(n)],
            "inclusive": [[f, c / total] for f, c in incl.most_common(n)]}


def short(frame: str) -> str:
    """``func (path/file.py:12)`` as ``func (file.py)``."""
    name, sep, where = frame.partition(" (")
    return "%s (%s)" % (name, where.split(":")[0].rsplit("/", 1)[-1]) if sep else frame


def profile(bench: Bench, out_dir: Path, seconds: int) -> Dict[str, Any]:
    exe = py_spy_exe()
    if exe is None:
        print("--py-spy: py-spy is not installed (pip install py-spy); no profile")
        return {}
    out_dir.mkdir(parents=True, exist_ok=True)
    found: Dict[str, Any] = {}
    for job, jargs in JOBS.items():
        procs = bench.procs("unpinned")
        spies = {}
        for name in ("nbdkit", "agent-A"):
            path = out_dir / ("%s-%s.txt" % (job, name))
            spies[name] = (path, subprocess.Popen(
                [exe, "record", "--threads", "--nonblocking", "-r", "100", "-f", "raw",
                 "-d", str(seconds + 2), "-p", str(procs[name]), "-o", str(path)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        bench.run("unpinned", jargs)
        for name, (path, proc) in spies.items():
            proc.wait()
            if path.exists():
                found["%s %s" % (job, name)] = top_frames(path)
    return found


# -- report ---------------------------------------------------------------------------------

def spread(xs: List[float], fmt: str) -> str:
    if not xs:
        return "-"
    med = statistics.median(xs)
    if len(xs) == 1:
        return fmt % med
    return (fmt + " (" + fmt + "-" + fmt + ")") % (med, min(xs), max(xs))


def ceiling(runs: Dict[str, List[Dict[str, Any]]], key: str) -> List[float]:
    """The faster no-op plugin of each repetition."""
    return [max(p[key], s[key]) for p, s in zip(runs["noop-parallel"], runs["noop-serialized"])]


def ratios(runs: Dict[str, List[Dict[str, Any]]], cond: str, base: List[float], key: str
           ) -> List[float]:
    return [r[key] / b for r, b in zip(runs[cond], base) if b]


def markdown(results: Dict[str, Dict[str, List[Dict[str, Any]]]], conds: List[str],
             head: str) -> str:
    lines = [head, "",
             "| job | condition | IOPS | MB/s | vs ceiling | splitter/nbdkit CPU-s/GiB | "
             "agent A CPU-s/GiB | agent B CPU-s/GiB | agent A CPU-s/GiB shipped | "
             "shipped/written | wire/shipped | drain s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for job, runs in results.items():
        key = "iops" if job.startswith("randwrite") else "mb_s"
        base = ceiling(runs, key) if job.startswith("randwrite") else [r[key] for r in runs["file"]]
        for cond in conds:
            rs = runs[cond]
            wire = [r["wire_bytes"] / r["shipped_bytes"] for r in rs
                    if r.get("shipped_bytes")]
            shipped = [r["shipped_bytes"] / r["bytes"] for r in rs
                       if "shipped_bytes" in r and r["bytes"]]
            lines.append("| %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s | %s |" % (
                job, cond, spread([r["iops"] for r in rs], "%.0f"),
                spread([r["mb_s"] for r in rs], "%.0f"),
                spread(ratios(runs, cond, base, key), "%.2f"),
                spread([r["cpu_s_per_gib_nbdkit"] for r in rs], "%.2f"),
                spread([r["cpu_s_per_gib_agent-A"] for r in rs if "cpu_s_per_gib_agent-A" in r],
                       "%.2f"),
                spread([r["cpu_s_per_gib_agent-B"] for r in rs if "cpu_s_per_gib_agent-B" in r],
                       "%.2f"),
                spread([r["agent_A_cpu_s_per_gib_shipped"] for r in rs
                        if "agent_A_cpu_s_per_gib_shipped" in r], "%.2f"),
                spread(shipped, "%.2f"), spread(wire, "%.2f"),
                spread([r["drain_s"] for r in rs] if cond in REPLICATING else [], "%.1f")))
    lines += ["", "\"vs ceiling\": 4 KiB against the faster no-op Python plugin of the same "
              "repetition, 64 KiB and 1 MiB against nbdkit file; median (min-max) over the "
              "repetitions. CPU-s/GiB: per GiB fio wrote, the agents' counted until site B "
              "held it all (drain). Shipped: record bytes agent A shipped, live and resynced "
              "(a queue that overflowed into the dirty map is resynced from the disk, in "
              "ranges that may be wider than the writes); wire: frame bytes sent."]
    return "\n".join(lines) + "\n"


def figures_of(results: Dict[str, Dict[str, List[Dict[str, Any]]]]) -> List[Dict[str, Any]]:
    out = []
    for job, runs in results.items():
        four = job.startswith("randwrite")
        key = "iops" if four else "mb_s"
        base = ceiling(runs, key) if four else [r[key] for r in runs["file"]]
        label = "the faster no-op Python plugin" if four else "nbdkit file"
        for cond, goal in (("paused", 0.9), ("pinned", 0.8)):
            rs = ratios(runs, cond, base, key) if cond in runs else []
            if not rs:
                continue
            ratio = statistics.median(rs)
            out.append(report.figure(
                "%s, splitter %s" % (job, "paused" if cond == "paused"
                                     else "replicating, site B pinned apart"),
                "%.0f %s" % (statistics.median(r[key] for r in runs[cond]), key),
                "%s %.0f" % (label, statistics.median(base)), ratio,
                ">= %.1fx %s" % (goal, label), ratio >= goal))
        if "pinned" not in runs:
            continue
        cpu = statistics.median(r["agent_A_cpu_s_per_gib_shipped"] for r in runs["pinned"])
        out.append(report.figure("%s, agent A CPU per GiB shipped" % job, "%.2f CPU-s/GiB" % cpu,
                                 "", None, "<= 1 CPU-s/GiB", cpu <= 1.0))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 s runs, one repetition")
    ap.add_argument("--seconds", type=int, default=None)
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--out", default=None)
    ap.add_argument("--compare-compression", action="store_true",
                    help="also run agent A with FERRY_COMPRESSION=zstd (the old policy)")
    ap.add_argument("--baseline", type=Path, default=None, metavar="TREE",
                    help="also run agent A from this Ferry source tree (e.g. `git archive "
                         "COMMIT | tar -x -C TREE`): before and after, side by side")
    ap.add_argument("--no-check", dest="check", action="store_false",
                    help="skip the restore that checks the replica at the end (it reads "
                         "the whole journal: minutes after a full run)")
    ap.add_argument("--conditions", nargs="+", default=None, metavar="COND",
                    help="run only these conditions (the baselines file and noop-* are "
                         "always run): paused pinned unpinned unpinned-zstd unpinned-base")
    ap.add_argument("--py-spy", dest="py_spy", default=None, metavar="DIR")
    args = ap.parse_args()
    seconds = args.seconds or (2 if args.quick else 5)
    reps = args.reps or (1 if args.quick else 3)
    conds = ["file", "noop-parallel", "noop-serialized", "paused", "pinned", "unpinned"]
    if args.compare_compression:
        conds.append("unpinned-zstd")
    if args.baseline:
        conds.append("unpinned-base")
    if args.conditions:
        unknown = set(args.conditions) - set(conds)
        if unknown:
            ap.error("unknown or unavailable conditions: %s" % " ".join(sorted(unknown)))
        conds = [c for c in conds if c in BASELINES or c in args.conditions]
    load = os.getloadavg()
    machine = report.machine()
    head = ("cost_split: %s, Ferry %s, load average at the start %s; %d s runs, %d "
            "repetition(s), conditions interleaved" % (
                time.strftime("%F %H:%M %Z"), machine.get("ferry", "?"),
                " ".join("%.2f" % x for x in load), seconds, reps))
    print(head, flush=True)
    work = Path(tempfile.mkdtemp(prefix="fyk", dir="/tmp"))
    bench = Bench(work, seconds, args.baseline)
    try:
        bench.start()
        results: Dict[str, Dict[str, List[Dict[str, Any]]]] = {
            job: {c: [] for c in conds} for job in JOBS}
        for rep in range(reps):
            for job, jargs in JOBS.items():
                for cond in conds:
                    r = bench.run(cond, jargs)
                    results[job][cond].append(r)
                    print("rep %d %-18s %-16s %8.0f IOPS %7.0f MB/s  CPU-s/GiB %s" % (
                        rep + 1, job, cond, r["iops"], r["mb_s"], " ".join(
                            "%s %.2f" % (k[len("cpu_s_per_gib_"):], v) for k, v in r.items()
                            if k.startswith("cpu_s_per_gib_"))), flush=True)
        profiles = profile(bench, Path(args.py_spy), seconds) if args.py_spy else {}
        text = markdown(results, conds, head)
        for name, frames in profiles.items():
            text += "\n%s, py-spy (%d samples with a Python frame, %d threads), top frames " \
                "(self):\n\n" % (name, frames["samples"], frames["threads"]) + "".join(
                "- %.0f%% %s\n" % (100 * share, f) for f, share in frames["self"])
            text += "\n%s, inclusive:\n\n" % name + "".join(
                "- %.0f%% %s\n" % (100 * share, f) for f, share in frames["inclusive"])
        print()
        print(text)
        figures = figures_of(results)
        report.print_figures(figures)
        path = report.write("cost_split", args.out, {
            "seconds": seconds, "reps": reps, "disk_bytes": SIZE, "jobs": JOBS,
            "conditions": conds}, figures, loadavg_start=load, runs=results,
            profiles=profiles, markdown=text)
        path.with_suffix(".md").write_text(text)
        if not args.check:
            return 0
        # Last, and after the figures are written: a restore walks the whole journal.
        t = time.monotonic()
        identical = bench.replica_identical()
        print("replica identical to the source: %s (restore and compare: %.0f s)"
              % (identical, time.monotonic() - t), flush=True)
        data = json.loads(path.read_text())
        data["replica_identical"] = identical
        path.write_text(json.dumps(data, indent=1, default=str))
        return 1 if identical is False else 0
    finally:
        bench.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
