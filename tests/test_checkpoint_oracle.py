"""Crash consistency at every checkpoint, with the oracle: a group of two disks written by
the oracle with checkpoints every 0.5 s; every checkpoint site B keeps is restored (both
disks) and must be one prefix of the writer's history for both, never older than the one
before it; the newest point holds every acknowledged write."""

from __future__ import annotations

import json
import time

from conftest import Lab

from lab.oracle import OracleWriter, check

MiB = 1024 * 1024


def test_every_checkpoint_is_one_prefix_of_both_disks(sites: Lab) -> None:
    disks = [sites.image("vda.img", 8 * MiB), sites.image("vdb.img", 8 * MiB)]
    uris = sites.protect("g1", *disks, extra=("--checkpoint-interval", "0.5s"))
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 8 * MiB, seed=61, blocks=1024, pause=0.002)
    writer.start()
    time.sleep(4)
    barrier = writer.finish()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    cps = json.loads(sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"]
    assert len(cps) >= 4, cps
    prefixes = []
    for c in cps:
        images = {}
        for name in ("vda", "vdb"):
            dest = sites.work / ("cp-%s-%s.img" % (c["id"], name))
            sites.b.ferry("restore", "g1", "--disk", name, "--checkpoint", c["id"],
                          "--to", str(dest))
            images[name] = str(dest)
        prefixes.append(check(images, writer.log).prefix)
        for p in images.values():
            sites.work.joinpath(p).unlink()
    assert prefixes == sorted(prefixes), prefixes
    newest = {n: str(sites.restore("g1", n)) for n in ("vda", "vdb")}
    v = check(newest, writer.log, barrier)
    assert v.prefix == writer.log.acked, v
    print("\ncheckpoints: %d restored, each one prefix of both disks: %s; newest %d of %d"
          % (len(cps), prefixes, v.prefix, writer.log.acked))
