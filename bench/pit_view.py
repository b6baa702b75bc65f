"""Point-in-time views: time to open one, and 4 KiB random reads through it.

    python bench/pit_view.py [--records N] [--record-size BYTES] [--disk-size BYTES]
                             [--reads N] [--dir DIR]

Builds a target group's journal directly (``TargetGroup.accept``, the code the receive loop
runs) with N random writes (default 1,000,000 of 512 bytes on a 1 GiB disk, with a group
checkpoint every 10,000 records), then:

- restores that checkpoint to a plain file and serves it with nbdkit's file plugin: the
  baseline ("the replica file read directly", same bytes, same transport);
- opens a view at the newest checkpoint through ``agent.views.Views`` (a real nbdkit with
  the view plugin, which loads the segments' index files) ``--reps`` times and reports the
  median time until its socket answers; also the plugin's map load alone, in process;
- reads ``--reads`` random 4 KiB blocks through the view and through the baseline with
  libnbd, one at a time, interleaved, ``--reps`` times, and reports p50/p99 of each and the
  median of the per-repetition ratios; every read through the view must equal the file's.
  The same reads go to a no-op Python plugin too: the floor of any view written in Python.

The last segment stays open (being written), as on a live target: the view gets its index
from the agent. Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import nbd

from agent.checkpoints import Checkpoint
from agent.journal import JRecord
from agent.replica import TargetGroup
from agent.views import Views
from nbd_plugin import jindex
from nbd_plugin.localwire import KIND_CONSISTENT, KIND_WRITE


def build(directory: str, records: int, rsize: int, disk: int) -> TargetGroup:
    g = TargetGroup(directory, "bench", [("vda", disk)], protection="bench")
    g.accept([JRecord(0, 1, 1, KIND_CONSISTENT, 0, 0, 0, 0, None)])
    rng = random.Random(1)
    seq = 1
    batch = 10000
    payload = os.urandom(rsize * 64)
    for n in range(0, records, batch):
        recs = []
        for _ in range(min(batch, records - n)):
            seq += 1
            off = rng.randrange(0, disk // 512 - rsize // 512) * 512
            start = rng.randrange(0, 63) * rsize
            recs.append(JRecord(0, 1, seq, KIND_WRITE, 0, off, rsize, seq,
                                payload[start:start + rsize]))
        cp = Checkpoint("b%d" % seq, seq, "auto", None, [(1, seq)])
        g.accept(recs, [cp], (time.time_ns(), seq))
    return g


def percentile(sorted_values: list, q: float) -> float:
    return sorted_values[min(len(sorted_values) - 1, int(len(sorted_values) * q))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--record-size", type=int, default=512)
    ap.add_argument("--disk-size", type=int, default=1 << 30)
    ap.add_argument("--reads", type=int, default=5000)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ferry-bench-", dir=args.dir)
    procs = []
    try:
        t0 = time.monotonic()
        g = build(os.path.join(root, "g"), args.records, args.record_size, args.disk_size)
        built = time.monotonic() - t0
        print("journal: %d records of %d B on a %d MiB disk, %d segments, %.0f MiB, built in "
              "%.1f s" % (args.records, args.record_size, args.disk_size >> 20,
                          len(g.journal.segments()), g.journal.size() / 2**20, built))
        cid = g.checkpoints[-1].id

        # The baseline: the same bytes in a plain file (a restore of the checkpoint),
        # served by nbdkit's file plugin, read the same way.
        dest = os.path.join(root, "restored.img")
        t0 = time.monotonic()
        g.restore("vda", dest, cid)
        print("restore of the checkpoint: %.1f s" % (time.monotonic() - t0))
        fsock = os.path.join(root, "file.sock")
        procs.append(subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--unix",
                                       fsock, "file", dest]))
        # And the floor of any Python plugin: one that answers without reading anything.
        nsock = os.path.join(root, "noop.sock")
        procs.append(subprocess.Popen(["nbdkit", "--foreground", "--readonly", "--unix",
                                       nsock, "python",
                                       str(Path(__file__).resolve().parent / "noop_plugin.py"),
                                       "size=%d" % args.disk_size]))

        views = Views(os.path.join(root, "data"))
        maps, opens = [], []
        for _ in range(args.reps):
            _c, specs = g.view_spec(cid, None)
            t0 = time.monotonic()
            jmap = jindex.build_map(specs[0])
            maps.append(time.monotonic() - t0)
            g.unpin()
            t0 = time.monotonic()
            v = views.open(g, cid, None, test=False)
            opens.append(time.monotonic() - t0)
            views.close(v["id"], {"bench": g})
        print("map load (in process): median %.3f s of %s; %d pieces in %d segments"
              % (statistics.median(maps), ["%.3f" % x for x in maps], jmap.pieces(),
                 jmap.segments))
        print("view open (nbdkit serving): median %.2f s of %s"
              % (statistics.median(opens), ["%.2f" % x for x in opens]))

        v = views.open(g, cid, None, test=False)
        hv, hf, hn = nbd.NBD(), nbd.NBD(), nbd.NBD()
        hv.connect_uri(v["disks"]["vda"])
        hf.connect_uri("nbd+unix:///?socket=" + fsock)
        hn.connect_uri("nbd+unix:///?socket=" + nsock)
        rng = random.Random(2)
        rows = []
        for rep in range(args.reps):
            offsets = [rng.randrange(0, args.disk_size // 4096) * 4096
                       for _ in range(args.reads)]
            lat: dict = {"view": [], "file": [], "noop": []}
            for i, off in enumerate(offsets):
                # Interleaved, rotating which goes first: all see the same machine.
                order = [(hv, "view"), (hf, "file"), (hn, "noop")]
                order = order[i % 3:] + order[:i % 3]
                got = {}
                for h, name in order:
                    t = time.perf_counter()
                    got[name] = h.pread(4096, off)
                    lat[name].append(time.perf_counter() - t)
                assert got["view"] == got["file"], "view and restore differ at %d" % off
            row = {}
            for name in lat:
                lat[name].sort()
                row[name] = (percentile(lat[name], 0.5) * 1e6, percentile(lat[name], 0.99) * 1e6)
            rows.append(row)
            print("rep %d: 4 KiB random reads, n=%d: view p50 %.0f us p99 %.0f us | file p50 "
                  "%.0f us p99 %.0f us | no-op Python p50 %.0f us p99 %.0f us | p99 view/file "
                  "%.2f" % (rep + 1, args.reads, row["view"][0], row["view"][1], row["file"][0],
                            row["file"][1], row["noop"][0], row["noop"][1],
                            row["view"][1] / row["file"][1]))
        hv.shutdown()
        hf.shutdown()
        hn.shutdown()
        views.close(v["id"], {"bench": g})
        print("median: view p50 %.0f us p99 %.0f us; file p50 %.0f us p99 %.0f us; no-op "
              "Python p50 %.0f us p99 %.0f us; p99 view/file %.2f, p50 view/file %.2f, p99 "
              "no-op/file %.2f" % (
                  statistics.median(r["view"][0] for r in rows),
                  statistics.median(r["view"][1] for r in rows),
                  statistics.median(r["file"][0] for r in rows),
                  statistics.median(r["file"][1] for r in rows),
                  statistics.median(r["noop"][0] for r in rows),
                  statistics.median(r["noop"][1] for r in rows),
                  statistics.median(r["view"][1] / r["file"][1] for r in rows),
                  statistics.median(r["view"][0] / r["file"][0] for r in rows),
                  statistics.median(r["noop"][1] / r["file"][1] for r in rows)))
        print("check: every read through the view equals the restored checkpoint")
        g.close()
    finally:
        for p in procs:
            p.terminate()
            p.wait()
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
