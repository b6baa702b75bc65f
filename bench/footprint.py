"""Memory per protected disk at steady load, and the dirty map through a long outage: its
memory against its budget, and how much more a resync reads than was written.

    python bench/footprint.py [--quick] [--disks 1,4,8] [--outage-disk GiB]
                              [--outage-seconds N] [--out FILE]

**Steady load.** For N = 1, 4, 8: two agents on loopback, N 256 MiB disks each protected
as its own group (default settings: a 256 MiB queue, the splitter's 16 MiB dirty-map
budget), and fio writing 2.5 MB/s to each (random 4/16/64 KiB). VmRSS of the source agent,
of each nbdkit splitter and of the target agent is sampled every 0.5 s once the load has
run a few seconds; medians reported, and the source agent's growth per added disk.

**Long outage.** One large sparse disk (64 GiB) protected with a 16 MiB queue; site B is
stopped; fio writes random 4 KiB blocks across the whole disk at QD 16 (fio's random map: no
block twice, so every write is a distinct block), the worst pattern for the dirty map. The
splitter's queue fills, then every change goes to its dirty map, which must keep its memory
within the 16 MiB budget (exact ranges, then a bitmap of 4 KiB blocks). Reported: the
splitter's RSS growth over the outage (queue + dirty map + allocator) against queue bound +
dirty budget, and the map's ``dirty_bytes`` (what a resync will read). Then site B comes
back, and what is sent again (the queue's records plus the resync's ``resync_bytes``) is set
against the distinct bytes written; the data bytes the resync shipped are shown too (holes
go as ranges).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import Pair, Sampler, fio_command

MiB = 1024 * 1024
GiB = 1024 * MiB
DISK = 256 * MiB
PER_DISK_RATE = 2_500_000
QUEUE_DEFAULT = 256 * MiB
DIRTY_BUDGET = 16 * MiB
OUTAGE_QUEUE = 16 * MiB


def steady(n: int, warmup: float, seconds: float) -> Dict[str, Any]:
    with Pair("fyf") as p:
        images = [p.image("d%d" % i, DISK) for i in range(n)]
        uris = []
        for i, img in enumerate(images):
            uris.append(p.protect("g%d" % i, [img])[img.stem])
        for i in range(n):
            p.a.ferry("wait", "g%d" % i, "--synced", "--timeout", "300")
        assert p.a.proc is not None and p.b.proc is not None
        apid, bpid = p.a.proc.pid, p.b.proc.pid
        spids = p.a.splitter_pids()
        idle = {"agent_a": report.rss_kib(apid), "agent_b": report.rss_kib(bpid),
                "splitters": [report.rss_kib(x) for x in spids]}
        jobs = [["--uri=" + u, "--rw=randwrite", "--bssplit=4k/50:16k/30:64k/20",
                 "--iodepth=4", "--rate=%d" % PER_DISK_RATE] for u in uris]
        fio = subprocess.Popen(fio_command(uris[0], DISK, warmup + seconds, jobs),
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(warmup)

        def sample() -> Dict[str, Any]:
            return {"agent_a": report.rss_kib(apid), "agent_b": report.rss_kib(bpid),
                    "splitters": [report.rss_kib(x) for x in spids]}

        sampler = Sampler(sample, 0.5).start()
        _out, err = fio.communicate()
        samples = sampler.stop()
        if fio.returncode != 0:
            raise RuntimeError("fio failed: %s" % err)
        status = p.a.status()["groups"]
        states = sorted({g["state"] for g in status.values()})
    return {"disks": n, "idle": idle, "states": states, "samples": len(samples),
            "agent_a_kib": report.median([s["agent_a"] for s in samples]),
            "agent_b_kib": report.median([s["agent_b"] for s in samples]),
            "splitter_kib": report.median([x for s in samples for x in s["splitters"]]),
            "splitter_max_kib": max(x for s in samples for x in s["splitters"])}


def outage(size: int, seconds: float, resync_limit: float) -> Dict[str, Any]:
    with Pair("fyo") as p:
        img = p.image("big", size)
        uri = p.protect("big", [img], "--queue", "%dM" % (OUTAGE_QUEUE // MiB))["big"]
        p.a.ferry("wait", "big", "--synced", "--timeout", "600")
        time.sleep(1)
        (spid,) = p.a.splitter_pids()
        base = p.a.status("big")["groups"]["big"]["disks"]["big"]
        rss0 = report.rss_kib(spid)
        p.b.stop()

        def sample() -> Dict[str, Any]:
            return {"t": time.monotonic(), "rss": report.rss_kib(spid)}

        sampler = Sampler(sample, 0.25).start()
        out = subprocess.run(fio_command(uri, size, seconds, [
            ["--rw=randwrite", "--bs=4k", "--iodepth=16", "--randseed=6"]]),
            capture_output=True, text=True, check=True)
        time.sleep(0.6)  # the splitter's counters reach the status every 0.5 s
        during = p.a.status("big")["groups"]["big"]["disks"]["big"]
        samples = sampler.stop()
        w = report.fio_write(report.fio_json(out.stdout)["jobs"][0])
        rss_end = report.rss_kib(spid)
        p.b.start()
        t = time.monotonic()
        synced = p.a.ferry("wait", "big", "--synced", "--timeout", "%d" % resync_limit,
                           check=False, timeout=resync_limit + 60).returncode == 0
        resync_s = time.monotonic() - t
        after = p.a.status("big")["groups"]["big"]["disks"]["big"]
    written = int(w["bytes"])
    return {
        "disk_bytes": size, "seconds": seconds, "writes": written // 4096,
        "written_bytes": written, "write_iops": w["iops"],
        "rss_before_kib": rss0, "rss_peak_kib": max([s["rss"] for s in samples] + [rss_end]),
        "rss_end_kib": rss_end,
        "dirty_bytes": during["dirty_bytes"], "queued_bytes": during["bytes_queued"],
        "state_during": during["state"],
        "resync_synced": synced, "resync_s": resync_s,
        "resync_bytes": after["resync_bytes"] - base["resync_bytes"],
        "resync_shipped_bytes": after["bytes_shipped"] - during["bytes_shipped"],
        "resync_progress": after.get("resync_progress"),
        "resync_eta_s": after.get("resync_eta_seconds"),
        "rss_series": [(s["t"] - samples[0]["t"], s["rss"]) for s in samples],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--disks", default=None, help="numbers of disks, e.g. 1,4,8")
    ap.add_argument("--outage-disk", type=int, default=None, help="GiB")
    ap.add_argument("--outage-seconds", type=float, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    counts = [int(x) for x in (args.disks or ("1,4" if args.quick else "1,4,8")).split(",")]
    warmup, seconds = (2.0, 3.0) if args.quick else (8.0, 15.0)
    # Quick: the machinery only (the map stays under its range budget); full: the map
    # passes its budget many times over and must keep merging.
    outage_size = (args.outage_disk or (3 if args.quick else 64)) * GiB
    outage_s = args.outage_seconds or (8.0 if args.quick else 60.0)
    resync_limit = 120 if args.quick else 600

    runs: List[Dict[str, Any]] = []
    for n in counts:
        r = steady(n, warmup, seconds)
        runs.append(r)
        print("%d disk(s): agent A %.1f MiB, agent B %.1f MiB, splitter %.1f MiB each "
              "(max %.1f) at %.1f MB/s per disk; states %s" % (
                  n, r["agent_a_kib"] / 1024, r["agent_b_kib"] / 1024,
                  r["splitter_kib"] / 1024, r["splitter_max_kib"] / 1024,
                  PER_DISK_RATE / 1e6, ",".join(r["states"])), flush=True)
    first, last = runs[0], runs[-1]
    span = last["disks"] - first["disks"]
    per_disk_a = (last["agent_a_kib"] - first["agent_a_kib"]) / span if span else None
    per_disk_b = (last["agent_b_kib"] - first["agent_b_kib"]) / span if span else None
    o = outage(outage_size, outage_s, resync_limit)
    growth = (o["rss_peak_kib"] - o["rss_before_kib"]) * 1024
    # Bytes the map covers that were never written: the detail it gave up for its budget.
    coarsened = max(0, o["dirty_bytes"] + o["queued_bytes"] - o["written_bytes"])
    budget = OUTAGE_QUEUE + DIRTY_BUDGET
    print("outage: %d distinct 4 KiB writes (%.0f MiB) over a %d GiB disk at %.0f IOPS; "
          "splitter RSS %.1f -> peak %.1f MiB (growth %.1f MiB; queue bound + dirty budget "
          "%d MiB); dirty map covers %.0f MiB, queue %.0f MiB" % (
              o["writes"], o["written_bytes"] / MiB, outage_size // GiB, o["write_iops"],
              o["rss_before_kib"] / 1024, o["rss_peak_kib"] / 1024, growth / MiB,
              budget // MiB, o["dirty_bytes"] / MiB, o["queued_bytes"] / MiB))
    print("resync: %s in %.1f s; read %.0f MiB, shipped %.0f MiB of data" % (
        "done" if o["resync_synced"] else "NOT done", o["resync_s"], o["resync_bytes"] / MiB,
        o["resync_shipped_bytes"] / MiB))
    splitter_budget = QUEUE_DEFAULT + DIRTY_BUDGET
    split_growth = (last["splitter_max_kib"] - min(last["idle"]["splitters"])) * 1024
    # What the target is sent again (the queue's records and the resync's reads) per
    # distinct byte written; predicted from the map when the resync did not end in time.
    resent = o["queued_bytes"] + (o["resync_bytes"] if o["resync_synced"] else o["dirty_bytes"])
    overshoot = resent / o["written_bytes"]
    figures = [
        report.figure(
            "agent RSS per protected disk at steady load",
            ("source agent %.1f MiB with %d disk(s), %.1f MiB with %d (+%.2f MiB per disk); "
             "target agent +%.2f MiB per disk; splitter %.1f MiB each (max %.1f)" % (
                 first["agent_a_kib"] / 1024, first["disks"], last["agent_a_kib"] / 1024,
                 last["disks"], (per_disk_a or 0) / 1024, (per_disk_b or 0) / 1024,
                 last["splitter_kib"] / 1024, last["splitter_max_kib"] / 1024)) if span else
            ("source agent %.1f MiB, target agent %.1f MiB with %d disk(s) (one disk count: "
             "no growth per disk); splitter %.1f MiB each (max %.1f)" % (
                 last["agent_a_kib"] / 1024, last["agent_b_kib"] / 1024, last["disks"],
                 last["splitter_kib"] / 1024, last["splitter_max_kib"] / 1024)),
            "splitter: idle RSS + queue %d MiB + dirty budget %d MiB; agents: no configured "
            "budget" % (QUEUE_DEFAULT // MiB, DIRTY_BUDGET // MiB),
            split_growth / splitter_budget, "within budget", split_growth <= splitter_budget,
            agent_a_per_disk_kib=per_disk_a, agent_b_per_disk_kib=per_disk_b,
            splitter_growth_bytes=split_growth),
        report.figure(
            "dirty-map memory in a long outage (random 4 KiB over %d GiB)" % (outage_size // GiB),
            "splitter RSS +%.1f MiB after %d distinct writes (map covers %.0f MiB, %.0f MiB "
            "of it merged in to stay in budget)" % (
                growth / MiB, o["writes"], o["dirty_bytes"] / MiB, coarsened / MiB),
            "queue %d MiB + dirty budget %d MiB" % (OUTAGE_QUEUE // MiB, DIRTY_BUDGET // MiB),
            growth / budget, "within budget", growth <= budget, growth_bytes=growth,
            coarsened_bytes=coarsened),
        report.figure(
            "resync after the outage: bytes sent again per distinct byte written",
            "%.2fx (%s%.0f MiB for %.0f MiB written; %.0f MiB of data shipped, in %.0f s)" % (
                overshoot, "" if o["resync_synced"] else "predicted from the map: ",
                resent / MiB, o["written_bytes"] / MiB, o["resync_shipped_bytes"] / MiB,
                o["resync_s"]),
            ratio=overshoot, overshoot=overshoot),
    ]
    report.print_figures(figures)

    def draw(plt: Any) -> None:
        _fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ns = [r["disks"] for r in runs]
        ax1.plot(ns, [r["agent_a_kib"] / 1024 for r in runs], "o-", label="source agent")
        ax1.plot(ns, [r["agent_b_kib"] / 1024 for r in runs], "s-", label="target agent")
        ax1.plot(ns, [r["splitter_kib"] / 1024 for r in runs], "^-", label="one splitter")
        ax1.set_xlabel("protected disks (one group each), 2.5 MB/s each")
        ax1.set_ylabel("RSS, MiB")
        ax1.set_ylim(bottom=0)
        ax1.legend(fontsize=8)
        ax1.set_title("steady load", fontsize=10)
        t = [x for x, _ in o["rss_series"]]
        ax2.plot(t, [v / 1024 for _, v in o["rss_series"]], label="splitter RSS")
        ax2.axhline((o["rss_before_kib"] * 1024 + budget) / MiB, ls="--", color="black",
                    lw=0.8, label="before + queue + dirty budget")
        ax2.set_xlabel("seconds of outage, random 4 KiB writes")
        ax2.set_ylabel("RSS, MiB")
        ax2.set_ylim(bottom=0)
        ax2.legend(fontsize=8)
        ax2.set_title("site B down, %d GiB disk" % (outage_size // GiB), fontsize=10)

    png = report.plot("footprint", draw)
    report.write("footprint", args.out, {
        "disk_counts": counts, "disk_bytes": DISK, "per_disk_rate": PER_DISK_RATE,
        "warmup_s": warmup, "seconds": seconds, "outage_disk_bytes": outage_size,
        "outage_seconds": outage_s, "outage_queue": OUTAGE_QUEUE,
        "dirty_budget": DIRTY_BUDGET, "resync_limit_s": resync_limit},
        figures, steady=runs, outage=o, plot=str(png) if png else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
