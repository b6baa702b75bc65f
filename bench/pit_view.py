"""Point-in-time views: time to open one, and 4 KiB random reads through it.

    python bench/pit_view.py [--records N] [--record-size BYTES] [--disk-size BYTES]
                             [--reads N] [--dir DIR]

Builds a target group's journal directly (``TargetGroup.accept``, the code the receive loop
runs) with N random writes (default 1,000,000 of 512 bytes on a 1 GiB disk, with a group
checkpoint every 10,000 records), then:

- opens a view at the newest checkpoint through ``agent.views.Views`` (a real nbdkit with
  the view plugin, which reads the segments' index files and builds its extent map) and
  reports the time until its socket answers; also the plugin's map build alone, in process;
- reads ``--reads`` random 4 KiB blocks through the view with libnbd, one at a time, and
  reports p50/p99/max latency;
- checks a sample of the reads against a restore of the same checkpoint.

Prints figures; asserts nothing about time.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--record-size", type=int, default=512)
    ap.add_argument("--disk-size", type=int, default=1 << 30)
    ap.add_argument("--reads", type=int, default=5000)
    ap.add_argument("--dir", default=None)
    args = ap.parse_args()
    root = tempfile.mkdtemp(prefix="ferry-bench-", dir=args.dir)
    try:
        t0 = time.monotonic()
        g = build(os.path.join(root, "g"), args.records, args.record_size, args.disk_size)
        built = time.monotonic() - t0
        print("journal: %d records of %d B on a %d MiB disk, %d segments, %.0f MiB, built in "
              "%.1f s" % (args.records, args.record_size, args.disk_size >> 20,
                          len(g.journal.segments()), g.journal.size() / 2**20, built))
        g.journal.rotate()  # every segment closed: views read index files
        cid = g.checkpoints[-1].id

        _c, specs = g.view_spec(cid, None)
        t0 = time.monotonic()
        emap = jindex.build_map(specs[0])
        map_s = time.monotonic() - t0
        g.unpin()
        print("extent map (in process): %.2f s, %d records, %d pieces"
              % (map_s, emap.records, emap.pieces()))

        views = Views(os.path.join(root, "data"))
        t0 = time.monotonic()
        v = views.open(g, cid, None, test=False)
        open_s = time.monotonic() - t0
        print("view open (nbdkit serving): %.2f s" % open_s)

        h = nbd.NBD()
        h.connect_uri(v["disks"]["vda"])
        rng = random.Random(2)
        lat = []
        offsets = [rng.randrange(0, args.disk_size // 4096) * 4096 for _ in range(args.reads)]
        got = {}
        for i, off in enumerate(offsets):
            t = time.perf_counter()
            data = h.pread(4096, off)
            lat.append(time.perf_counter() - t)
            if i % 50 == 0:
                got[off] = data
        h.shutdown()
        lat.sort()
        print("4 KiB random reads through the view: n=%d p50 %.0f us  p99 %.0f us  max %.0f us"
              "  (mean %.0f us)" % (len(lat), lat[len(lat) // 2] * 1e6,
                                     lat[int(len(lat) * 0.99)] * 1e6, lat[-1] * 1e6,
                                     statistics.mean(lat) * 1e6))
        views.close(v["id"], {"bench": g})
        dest = os.path.join(root, "restored.img")
        g.restore("vda", dest, cid)
        with open(dest, "rb") as f:
            for off, data in got.items():
                f.seek(off)
                assert f.read(4096) == data, "view and restore differ at %d" % off
        print("check: %d sampled reads equal the restored checkpoint" % len(got))
        g.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
