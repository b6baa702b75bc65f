"""Scrub: every replica chunk checked against the digest promotion keeps (digests.py); a
flipped byte is found, asked of the source again and repaired, the group replicating."""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from conftest import Lab
from test_faults import wait_for
from test_repair import flip_replica_byte, restored_as, written_disk

from agent.target.digests import CHUNK, HEADER, ReplicaDigests

MiB = 1024 * 1024


def test_scrub_finds_a_flipped_replica_byte_and_the_source_repairs_it(sites: Lab) -> None:
    disk, _uri = written_disk(sites)
    out = json.loads(sites.b.ferry("scrub", "g1", "--json").stdout)
    d = out["disks"]["vda"]
    assert d["damaged"] == [] and d["checked_chunks"] + d["baseline_chunks"] == 8, out
    flip_replica_byte(sites, 5 * MiB + 7)
    proc = sites.b.ferry("scrub", "g1", check=False)
    assert proc.returncode == 1, proc
    assert "1 damaged range(s): asked the source for them again" in proc.stdout, proc.stdout
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["last_scrub"]["disks"]["vda"]["damaged"] == [[5 * MiB, MiB]], st["last_scrub"]

    def repaired() -> bool:
        sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
        return restored_as(sites, disk)

    wait_for(repaired, timeout=90, what="the repair")
    # Asked once: until the applier writes the chunk again, later scrubs leave it be.
    out = json.loads(sites.b.ferry("scrub", "g1", "--json").stdout)
    assert out["disks"]["vda"]["damaged"] == [] and not out["repair_asked"], out
    proc = sites.b.ferry("scrub", "g1", "--disk", "nosuch", check=False)
    assert proc.returncode == 3 and "nosuch" in proc.stderr


def test_digests_follow_writes_and_persist(tmp_path: Path) -> None:
    replica = tmp_path / "r.img"
    size = 3 * CHUNK + 100
    replica.write_bytes(os.urandom(size))
    fd = os.open(replica, os.O_RDWR)
    lock = threading.Lock()
    try:
        d = ReplicaDigests(str(tmp_path / "r.digests"), size)
        first = d.scrub(fd, lock)
        assert first == {"checked": 0, "baseline": 4, "damaged": []}
        again = ReplicaDigests(str(tmp_path / "r.digests"), size)  # persisted
        assert again.scrub(fd, lock) == {"checked": 4, "baseline": 0, "damaged": []}
        # A write through the applier's path: marked, updated, still good.
        os.pwrite(fd, b"x" * 10, CHUNK - 5)
        again.touched(CHUNK - 5, 10)
        assert again.scrub(fd, lock)["checked"] == 2  # the two touched chunks are skipped
        again.update(fd)
        assert again.scrub(fd, lock) == {"checked": 4, "baseline": 0, "damaged": []}
        # A write nobody told it of: damage, merged across neighbours, reported once.
        os.pwrite(fd, b"y" * 2, 2 * CHUNK - 1)
        found = again.scrub(fd, lock)
        assert found["damaged"] == [(CHUNK, 2 * CHUNK)], found
        assert again.scrub(fd, lock)["damaged"] == []
        again.touched(CHUNK, 1)  # written again: checked again
        again.update(fd)
        assert again.scrub(fd, lock)["damaged"] == []
        # Forgotten (a commit wrote the replica): a new baseline.
        again.forget()
        assert ReplicaDigests(str(tmp_path / "r.digests"), size).scrub(fd, lock)["baseline"] \
            == 4
    finally:
        os.close(fd)


def test_a_torn_or_foreign_digests_file_is_a_new_baseline(tmp_path: Path) -> None:
    path = tmp_path / "r.digests"
    path.write_bytes(b"FRY")
    assert ReplicaDigests(str(path), CHUNK).entries == [0]
    path.write_bytes(HEADER.pack(b"FRYDIG01", CHUNK, 2 * CHUNK, 0) + b"\1" * 16)
    assert ReplicaDigests(str(path), CHUNK).entries == [0]  # another disk size
    path.write_bytes(HEADER.pack(b"NOTOURS1", CHUNK, CHUNK, 0) + b"\1" * 8)
    assert ReplicaDigests(str(path), CHUNK).entries == [0]


def test_the_periodic_scrub_finds_a_flipped_byte_and_the_source_repairs_it(lab: Lab) -> None:
    lab.b.extra_args = ["--scrub-period", "2s", "--scrub-rate", "64M"]
    lab.b.start()
    lab.a.start()
    disk, _uri = written_disk(lab)
    st = lab.b.status("g1")["replicas"]["g1"]
    wait_for(lambda: (lab.b.status("g1")["replicas"]["g1"]["last_scrub"] or {})
             .get("periodic"), 60, what="a periodic pass: %s" % st)
    flip_replica_byte(lab, 6 * MiB + 99)
    started = time.monotonic()

    def found() -> bool:
        last = lab.b.status("g1")["replicas"]["g1"]["last_scrub"]
        return last["disks"]["vda"]["damaged"] == [[6 * MiB, MiB]]

    wait_for(found, 60, what="the periodic scrub to find the flip")
    assert "the periodic scrub found the replica of vda damaged at %d+%d" % (6 * MiB, MiB) \
        in lab.b.log.read_text()

    def repaired() -> bool:
        lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
        return restored_as(lab, disk)

    wait_for(repaired, timeout=90, what="the repair")
    print("periodic scrub: found and repaired in %.1f s" % (time.monotonic() - started))
    st = lab.b.status("g1")["replicas"]["g1"]
    assert "scrubbing" in st and st["last_scrub"]["time"] is not None


def test_scrub_pacing() -> None:
    from agent.target.scrubber import Scrubber

    s = Scrubber(dict, lambda *a: None, lambda *a: None, period=100.0, rate=CHUNK)
    assert s.interval(10) == 10.0   # the period spread over the chunks
    assert s.interval(1000) == 1.0  # the rate caps it
    s.rate = 0
    assert s.interval(1000) == 0.1


def test_a_restore_reading_a_damaged_replica_chunk_is_refused_and_repaired(sites: Lab
                                                                            ) -> None:
    disk, _uri = written_disk(sites)
    sites.a.stop()  # nothing is repaired while it is looked at
    flip_replica_byte(sites, 2 * MiB + 5)
    dest = sites.work / "r.img"
    proc = sites.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest), check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 1 and len(err.splitlines()) == 1, err
    assert "replica %s" % sites.b.status("g1")["replicas"]["g1"]["disks"]["vda"]["replica"] \
        in err and "bytes %d+%d" % (2 * MiB, MiB) in err, err
    assert not dest.exists()
    # A view is refused too (the chunk is known damaged now), naming it.
    proc = sites.b.ferry("view", "g1", check=False)
    assert proc.returncode == 1 and "bytes %d+%d" % (2 * MiB, MiB) in proc.stderr, proc.stderr
    wait_for(lambda: sites.b.status("g1")["replicas"]["g1"]["repairs_queued"] == 1, 30,
             what="the repair to be queued")
    started = time.monotonic()
    sites.a.start()
    wait_for(lambda: restored_as(sites, disk), 90, what="the repair")
    print("replica chunk flipped: repaired %.1f s after A started" % (time.monotonic() - started))
    view = json.loads(sites.b.ferry("view", "g1", "--json").stdout)
    sites.b.ferry("view-close", view["id"])
