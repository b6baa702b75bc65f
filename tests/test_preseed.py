"""Pre-seeded sync end to end: real agents, real nbdkit splitters, a seed file on site B
that differs from the disk in a few chunks. Only those chunks (and what the guest writes
meanwhile) cross the link, and site B ends byte-identical to the source."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Set

import nbd
from conftest import Lab, first_difference, same_bytes, samples

MiB = 1024 * 1024
SIZE = 128 * MiB


def random_disk(path: Path, size: int = SIZE, seed: int = 1) -> None:
    rng = random.Random(seed)
    with open(path, "wb") as f:
        for off in range(0, size, MiB):
            f.write(rng.randbytes(min(MiB, size - off)))


def write_at(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def punch(path: Path, offset: int, length: int) -> None:
    subprocess.run(["fallocate", "--punch-hole", "--offset", str(offset), "--length",
                    str(length), str(path)], check=True)


def make_seed(disk: Path, seed_file: Path, chunks: List[int]) -> None:
    """A copy of ``disk`` whose ``chunks`` differ in data (a whole chunk, a few bytes)."""
    shutil.copyfile(disk, seed_file)
    rng = random.Random(99)
    for i, c in enumerate(chunks):
        if i % 2:
            write_at(seed_file, c * MiB + 4321, b"not the same" * 8)
        else:
            write_at(seed_file, c * MiB, rng.randbytes(MiB))


def digest(path: Path) -> str:
    return subprocess.run(["sha256sum", str(path)], capture_output=True, text=True,
                          check=True).stdout.split()[0]


def disk_status(lab: Lab, group: str = "g1", disk: str = "vda") -> Dict[str, Any]:
    st: Dict[str, Any] = lab.a.api("GET", "/v1/status")["groups"][group]["disks"][disk]
    return st


class ChunkWriter(threading.Thread):
    """Writes random blocks into a few chunks through the splitter until stopped."""

    def __init__(self, uri: str, chunks: List[int], seed: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.chunks = chunks
        self.rng = random.Random(seed)
        self.errors: List[BaseException] = []
        self.written = 0
        self.touched: Set[int] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        try:
            h = nbd.NBD()
            h.connect_uri(self.uri)
            while not self._halt.is_set():
                c = self.rng.choice(self.chunks)
                length = self.rng.choice([4096, 65536])
                offset = c * MiB + self.rng.randrange(0, MiB - length, 4096)
                if self.rng.random() < 0.1:
                    h.zero(length, offset)
                else:
                    h.pwrite(self.rng.randbytes(length), offset)
                self.written += length
                self.touched.add(c)
                time.sleep(0.005)
            h.flush()
            h.shutdown()
        except BaseException as e:  # the test reads it
            self.errors.append(e)

    def finish(self) -> None:
        self._halt.set()
        self.join(30)
        assert not self.is_alive() and self.errors == [], self.errors


def protect(lab: Lab, disk: Path, seed_file: Path, *extra: str) -> str:
    out = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target", lab.b.address,
                      "--preseeded", "vda=%s" % seed_file, *extra).stdout
    return out.split("\t")[1].strip()


def check_identical(lab: Lab, disk: Path) -> None:
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "300")
    restored = lab.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_preseeded_sync_ships_about_the_differing_chunks(sites: Lab) -> None:
    disk = sites.work / "vda.img"
    random_disk(disk)
    punch(disk, 30 * MiB, 2 * MiB)              # zero on the disk, data in the seed
    seed_file = sites.work / "seed.img"
    differ = [3, 10, 64, 127]                    # the last one ends the sync
    make_seed(disk, seed_file, differ)
    punch(seed_file, 20 * MiB, MiB)              # a hole in the seed, data on the disk
    differ.append(20)
    seed_digest = digest(seed_file)
    # 4 MiB/s: the differing chunks take a second or so, so the guest writes while they go.
    uri = protect(sites, disk, seed_file, "--bandwidth", "4M")
    written = [50, 51, 52, 53, 54, 55, 56, 57]
    writer = ChunkWriter(uri, written, 5)
    writer.start()
    seen = set()
    first_sync: Dict[str, float] = {}
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = disk_status(sites)
        seen.add(st["state"])
        # The guest writes for 3 s of the sync: this writer (about 7 MB/s) outruns the
        # 4 MB/s link, so the sync would not end while it writes.
        if st["state"] == "replicating" or (
                "initial-sync" in seen and writer.written
                and time.monotonic() - first_sync.setdefault("t", time.monotonic()) > 3):
            break
        time.sleep(0.05)
    writer.finish()
    assert "initial-sync" in seen, seen  # the guest wrote while the sync ran
    check_identical(sites, disk)
    st = disk_status(sites)
    g = sites.a.status("g1")["groups"]["g1"]
    # Shipped: the differing chunks, the chunks the guest wrote before their resync came
    # (read back whole), and the guest's writes; everything else was already at site B.
    shipped_bound = (len(differ) + len(writer.touched)) * MiB + writer.written
    assert st["bytes_shipped"] <= shipped_bound, (st, writer.written)
    assert st["bytes_shipped"] >= len(differ) * MiB
    assert st["resync_skipped_bytes"] >= SIZE - (len(differ) + 2 + len(written)) * MiB
    assert g["bytes_sent"] <= st["bytes_shipped"] + MiB, g  # frames add little
    assert g["bytes_received"] < MiB  # the digests: 16 bytes per MiB, and the acks
    assert digest(seed_file) == seed_digest  # the admin's file is only read
    b = sites.b.status("g1")["replicas"]["g1"]["disks"]["vda"]
    assert b["ever_consistent"] and b["seed_untouched_chunks"] is None  # dropped at the end
    assert not (sites.b.data / "target" / "g1" / "seeds" / "vda.digests").exists()
    assert "seed held" in sites.a.ferry("status").stdout
    metrics = samples(sites.a.api("GET", "/metrics"))
    assert metrics[("ferry_resync_skipped_bytes_total", (("disk", "vda"), ("group", "g1")))] \
        == st["resync_skipped_bytes"]


def test_preseeded_sync_goes_on_after_site_b_is_killed(sites: Lab) -> None:
    disk = sites.work / "vda.img"
    random_disk(disk, seed=2)
    seed_file = sites.work / "seed.img"
    make_seed(disk, seed_file, [10, 40, 70, 100, 127])
    protect(sites, disk, seed_file, "--bandwidth", "1M")  # a second per differing chunk
    deadline = time.monotonic() + 60
    while disk_status(sites)["resync_skipped_bytes"] < 20 * MiB:
        assert time.monotonic() < deadline, disk_status(sites)
        time.sleep(0.05)
    sites.b.kill()
    before = disk_status(sites)["resync_skipped_bytes"]
    assert before < 70 * MiB
    time.sleep(1)
    sites.b.start()
    check_identical(sites, disk)
    st = disk_status(sites)
    # After the restart site B sent its digests again, with what it had journaled marked.
    assert st["resync_skipped_bytes"] - before >= 50 * MiB, st
    assert st["bytes_shipped"] <= 12 * MiB, st


def test_preseeded_sync_with_both_processes_of_site_a_killed(sites: Lab) -> None:
    """Site A's agent and splitter are killed while the guest writes: the splitter's
    unshipped records are lost, the new one reads the disk again, and the new session's
    digests come from site B alone. A chunk the guest wrote (shipped) and then wrote back
    to the seed's bytes (likely lost) must not be taken for the seed's."""
    disk = sites.work / "vda.img"
    random_disk(disk, 64 * MiB + 64 * 1024, seed=3)  # the last chunk is short
    seed_file = sites.work / "seed.img"
    make_seed(disk, seed_file, [5, 60])
    original = disk.read_bytes()[33 * MiB:34 * MiB]
    uri = protect(sites, disk, seed_file, "--bandwidth", "1M")
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(os.urandom(MiB), 33 * MiB)  # shipped: site B's chunk 33 is not the seed's now
    h.flush()
    writer = ChunkWriter(uri, [40, 41], 6)
    writer.start()
    time.sleep(1.5)
    h.pwrite(original, 33 * MiB)  # back to the seed's bytes, likely still in the queue
    writer.finish()
    sites.a.kill()
    sites.a.kill_splitters()
    sites.a.start()
    deadline = time.monotonic() + 60
    while not sites.a.splitter_pids() or disk_status(sites)["state"] == "splitter-down":
        assert time.monotonic() < deadline, "the splitter did not come back"
        time.sleep(0.1)
    h2 = nbd.NBD()
    h2.connect_uri(uri)
    h2.pwrite(b"after the restart" * 100, 41 * MiB)
    h2.flush()
    h2.shutdown()
    check_identical(sites, disk)
    # The new agent counts from its start: the new splitter read the whole disk again, and
    # what matched went as seeded records, the short last chunk too.
    skipped = disk_status(sites)["resync_skipped_bytes"]
    assert skipped >= 40 * MiB and skipped % MiB == 64 * 1024, skipped


# -- what is refused, and changes nothing ---------------------------------------------------

def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def refused(lab: Lab, *args: str) -> str:
    line = error_line(lab.a.ferry("protect", *args, check=False))
    assert lab.a.status()["groups"] == {}
    return line


def test_a_seed_of_the_wrong_size_is_refused(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    seed_file = sites.work / "seed.img"
    with open(seed_file, "wb") as f:
        f.truncate(4 * MiB)
    line = refused(sites, "g1", "--disk", "vda=%s" % disk, "--target", sites.b.address,
                   "--preseeded", "vda=%s" % seed_file)
    assert "is 4194304 bytes; the disk is 8388608 bytes" in line, line
    assert not (sites.b.data / "target" / "g1").exists()


def test_a_missing_seed_is_refused(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    line = refused(sites, "g1", "--disk", "vda=%s" % disk, "--target", sites.b.address,
                   "--preseeded", "vda=%s" % (sites.work / "nope.img"))
    assert "nope.img" in line and "No such file" in line, line
    assert not (sites.b.data / "target" / "g1").exists()


def test_a_seed_for_an_unknown_disk_is_refused(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    seed_file = sites.image("seed.img", 8 * MiB)
    line = refused(sites, "g1", "--disk", "vda=%s" % disk, "--target", sites.b.address,
                   "--preseeded", "vdb=%s" % seed_file)
    assert "disk vdb, which group g1 does not have" in line, line
    line = refused(sites, "g1", "--disk", "vda=%s" % disk, "--target", sites.b.address,
                   "--preseeded", "vda=seed.img")
    assert "absolute path" in line, line
    line = refused(sites, "g1", "--disk", "vda=%s" % disk, "--target", sites.b.address,
                   "--preseeded", "vda=%s" % seed_file, "--preseeded", "vda=%s" % seed_file)
    assert "twice" in line, line
    assert not (sites.b.data / "target" / "g1").exists()


def test_a_seed_for_a_group_site_b_holds_is_refused(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    write_at(disk, MiB, b"kept" * 1000)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    sites.a.ferry("unprotect", "g1")
    meta = (sites.b.data / "target" / "g1" / "meta.json").read_bytes()
    seed_file = sites.image("seed.img", 8 * MiB)
    line = refused(sites, "g1", "--disk", "vda=%s" % disk, "--target", sites.b.address,
                   "--preseeded", str(seed_file))  # one disk: the name may be left out
    assert "already holds group g1" in line, line
    assert (sites.b.data / "target" / "g1" / "meta.json").read_bytes() == meta
    assert same_bytes(disk, sites.restore("g1", "vda"))
