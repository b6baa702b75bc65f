"""Journal damage repaired from the source, with nobody's help: site B asks site A for the
disk ranges of its damaged records, the resent records cover them, the newest point restores
again and promotion passes the damage, while the points between stay refused (a gap in
history, said in the checkpoint listing). The writer keeps writing; a second group
replicates meanwhile, unaffected."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from pathlib import Path
from typing import Dict, List

import pytest
from conftest import Lab, first_difference, same_bytes
from test_faults import wait_for
from test_integrity import (
    SIZE,
    MiB,
    checkpoint,
    connect,
    flip_big_write,
    protected,
    records,
    replica_status,
    restore,
    segments,
    synced,
    write,
)

from agent.target import damage
from formats.records import KIND_APPLIED, KIND_CHECKPOINT, KIND_WRITE, KIND_ZERO


class Writer:
    """A guest that keeps writing 4 KiB blocks (and flushing) until stopped."""

    def __init__(self, uri: str, seed: int) -> None:
        self.uri, self.rng = uri, random.Random(seed)
        self.stop_now = threading.Event()
        self.writes = 0
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        h = connect(self.uri)
        while not self.stop_now.is_set():
            h.pwrite(self.rng.randbytes(4096), self.rng.randrange(0, SIZE - 4096, 4096))
            self.writes += 1
            if self.writes % 16 == 0:
                h.flush()
                time.sleep(0.05)
        h.flush()
        h.shutdown()

    def stop(self) -> None:
        self.stop_now.set()
        self.thread.join(30)


def listing(lab: Lab, group: str) -> Dict[str, Dict]:
    out = json.loads(lab.b.ferry("checkpoints", group, "--json").stdout)
    return {c["tag"]: c for c in out["target"] if c.get("tag")}


@pytest.mark.parametrize("b_running", [False, True])
def test_damage_in_a_closed_segment_is_repaired_from_the_source(sites: Lab,
                                                                 b_running: bool) -> None:
    # History 24 s: a segment closes once its first record is 3 s old.
    disk, uri = protected(sites, "g1", "--history", "24s")
    disk2, uri2 = protected(sites, "g2")
    rng = random.Random(11)
    write(uri, rng)
    zero_id, zero_copy = checkpoint(sites, "g1", disk, "zero")
    time.sleep(3.5)
    write(uri, rng, big=True)
    checkpoint(sites, "g1", disk, "one")
    time.sleep(3.5)
    write(uri, rng)
    checkpoint(sites, "g1", disk, "two")
    if not b_running:
        sites.b.stop()
    closed = [s for s in segments(sites, "g1")[:-1]
              if any(k == KIND_WRITE and n == MiB for _p, k, n in records(s))]
    assert closed
    flip_big_write(closed[-1])
    started = time.monotonic()
    if not b_running:
        sites.b.start()  # found at open: the closed segment's records are checked
    else:
        restore(sites, "g1", "g1-vda", check=False)  # found when read
    writer = Writer(uri, 12)
    writer2 = Writer(uri2, 13)
    try:
        # Repaired: the newest state restores again, the group is no longer damaged.
        def repaired() -> bool:
            st = replica_status(sites, "g1")
            return bool(st["damage"]) and st["damage"][0]["repaired_at"] is not None \
                and st["state"] == "receiving"

        wait_for(repaired, 120, what="the repair: %s" % replica_status(sites, "g1"))
        took = time.monotonic() - started
        st = replica_status(sites, "g1")
        d = st["damage"][0]
        assert (d["disk"], d["disk_offset"], d["disk_length"]) == ("g1-vda", 2 * MiB, MiB), d
        # What the writer had not written over yet (its writes cover the rest).
        assert "journal damage: asked the source for " in sites.b.log.read_text()
        assert "read again and sent (repair)" in sites.a.log.read_text()
        # The gap: "one" and "two" needed the damaged record and were cut before the
        # repair; "zero" is older and still whole.
        tags = listing(sites, "g1")
        assert "refused" not in tags["zero"], tags["zero"]
        for tag in ("one", "two"):
            assert "the gap before it" in tags[tag]["refused"], tags[tag]
            _dest, proc = restore(sites, "g1", "g1-vda", "--checkpoint", tag, check=False)
            assert proc.returncode != 0 and "the gap" in proc.stderr  # type: ignore
        text = sites.b.ferry("checkpoints", "g1").stdout
        assert "refused: group g1, disk g1-vda: journal segment" in text, text
        restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", zero_id)
        assert same_bytes(zero_copy, restored), first_difference(zero_copy, restored)
        # A checkpoint cut after the repair restores (the writer keeps writing).
        after = sites.a.ferry("checkpoint", "g1", "--tag", "after").stdout.strip()
        sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
        restore(sites, "g1", "g1-vda", "--checkpoint", after)
        print("damage %s, B %s: repaired in %.1f s; checkpoints lost to the gap: one, two"
              % (d["file"], "running" if b_running else "stopped at the flip", took))
        # A view of the newest point reads the repaired range as a restore does.
        view = json.loads(sites.b.ferry("view", "g1", "--checkpoint", after,
                                        "--json").stdout)
        h = connect(view["disks"]["g1-vda"])
        seen = h.pread(MiB, 2 * MiB)
        h.shutdown()
        sites.b.ferry("view-close", view["id"])
        dest, _ = restore(sites, "g1", "g1-vda", "--checkpoint", after)
        assert seen == dest.read_bytes()[2 * MiB:3 * MiB]
        if not b_running:
            # Promotion passes the repaired damage once it leaves the window (made old
            # here): its segment is applied and deleted, and the damage with it.
            old = time.time() - 3600
            for seg in segments(sites, "g1"):
                if seg <= closed[-1]:
                    os.utime(seg, (old, old))
            wait_for(lambda: not replica_status(sites, "g1")["damage"], 120,
                     what="promotion past the damage: %s" % replica_status(sites, "g1"))
            restore(sites, "g1", "g1-vda", "--checkpoint", after)
    finally:
        writer.stop()
        writer2.stop()
    assert writer.writes and writer2.writes
    for group, path in (("g1", disk), ("g2", disk2)):
        synced(sites, group)
        restored = sites.restore(group, path.stem)
        assert same_bytes(path, restored), first_difference(path, restored)
    assert replica_status(sites, "g2")["damage"] == []
    assert sites.b.proc is not None and sites.b.proc.poll() is None


# -- damage.Mend (unit) ---------------------------------------------------------------------

def test_mend_needs_a_trusted_range_or_every_disk_whole() -> None:
    read = damage.Damage(3, 100, 200, found="read", disk=1, disk_offset=4096,
                         disk_length=8192, kind=KIND_WRITE)
    assert damage.needs(read, [MiB, MiB]) == {1: [(4096, 12288)]}
    opened = damage.Damage(3, 100, 200, found="open", disk=1, disk_offset=4096,
                           disk_length=8192)
    assert damage.needs(opened, [MiB, 2 * MiB]) == {0: [(0, MiB)], 1: [(0, 2 * MiB)]}
    marker = damage.Damage(3, 100, 200, found="read", kind=KIND_CHECKPOINT)
    assert damage.needs(marker, [MiB]) == {}


def test_mend_counts_covering_records_and_their_points() -> None:
    m = damage.Mend({0: [(0, 100)], 1: [(50, 60)]})
    assert not m.feed(0, KIND_WRITE, 1, 5, 0, 40)
    assert not m.feed(1, KIND_CHECKPOINT, 1, 6, 50, 10)  # not a covering kind
    assert not m.feed(0, KIND_ZERO, 1, 7, 90, 50)
    assert m.asks() == {0: [(40, 50)], 1: [(50, 10)]}
    assert not m.feed(1, KIND_APPLIED, 2, 1, 0, 55)
    assert not m.feed(0, KIND_WRITE, 1, 8, 40, 50)
    assert m.feed(1, KIND_WRITE, 2, 9, 55, 5)
    assert m.points == {0: (1, 8), 1: (2, 9)}
    d = damage.Damage(1, 0, 10, repaired_at=[2, 0], repaired_points=[[0, 1, 8], [1, 2, 9]])
    assert d.covers([(1, 8), (2, 9)]) and d.covers([(2, 0), (3, 0)])
    assert not d.covers([(1, 7), (2, 9)])
    assert not damage.Damage(1, 0, 10).covers([(9, 9)])


def test_repaired_damage_round_trips_through_damage_json(tmp_path: Path) -> None:
    d = damage.Damage(1, 0, 10, repaired_at=[2, 0], repaired_points=[[0, 1, 8]],
                      kind=KIND_WRITE)
    damage.save(str(tmp_path), [d])
    assert damage.load(str(tmp_path)) == [d]
    old: List[Dict] = [{"segment": 1, "offset": 0, "end": 10, "missing": 0, "found": "open",
                        "disk": None, "disk_offset": None, "disk_length": None}]
    (tmp_path / "damage.json").write_text(json.dumps({"damage": old}))
    assert damage.load(str(tmp_path))[0].repaired_at is None  # from before repairs
