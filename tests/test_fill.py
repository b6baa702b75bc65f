"""Site B's data on a small file system that fills (ext4 on a loop device): site B never
acknowledges what it could not write, the source shows ``journal-full`` (a warning event),
replication resumes by itself once space is freed, and the oracle passes every point."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Lab
from test_faults import wait_for

from lab.oracle import OracleWriter, check

MiB = 1024 * 1024
FS_SIZE = 48 * MiB


def fill(directory: Path) -> Path:
    """A ballast file that takes every free byte of ``directory``'s file system."""
    ballast = directory / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        block = b"\xa5" * MiB
        while True:
            try:
                os.write(fd, block)
            except OSError as e:
                if e.errno != errno.ENOSPC:
                    raise
                if len(block) == 4096:
                    break
                block = block[:len(block) // 4]
        os.fsync(fd)
    finally:
        os.close(fd)
    return ballast


def full_events(lab: Lab) -> list:
    events = [json.loads(x) for x in lab.a.ferry("events", "--json").stdout.splitlines()]
    return [e for e in events if e.get("new") == "journal-full"]


@pytest.fixture
def small_b(lab: Lab, tmp_path: Path):
    """Site B's data directory on a fresh 48 MiB ext4 file system (loop-mounted)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    image = tmp_path / "b-fs.img"
    with open(image, "wb") as f:
        f.truncate(FS_SIZE)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(image)], check=True)
    lab.b.data.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-o", "loop", str(image), str(lab.b.data)], check=True)
    try:
        yield lab
    finally:
        lab.close()
        subprocess.run(["umount", str(lab.b.data)], check=False)


def test_a_full_file_system_on_site_b(small_b: Lab) -> None:
    lab = small_b
    lab.b.start()
    lab.a.start()
    disk = lab.image("vda.img", 8 * MiB)
    uris = lab.protect("g1", disk)
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 8 * MiB, seed=21, blocks=1024, pause=0.002)
    writer.start()
    try:
        wait_for(lambda: writer.log.acked > 100, what="the writer to start")
        ballast = fill(lab.b.data)
        wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] == "journal-full",
                 timeout=60, what="journal-full on the source")
        g = lab.a.status("g1")["groups"]["g1"]
        assert "file system is full" in g["error"], g
        # The event (the watcher samples status every 0.5 s; the source retries meanwhile).
        wait_for(lambda: full_events(lab), timeout=60, what="a journal-full event")
        # What site B holds now is a point the writer wrote: nothing half-kept was acked.
        held = check({"vda": str(lab.restore("g1", "vda"))}, writer.log)
        acked_while_full = writer.log.acked
        ballast.unlink()
        wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] == "replicating",
                 timeout=90, what="replication to resume once space was freed")
    finally:
        barrier = writer.finish()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    v = check({"vda": str(lab.restore("g1", "vda"))}, writer.log, barrier)
    assert v.prefix == writer.log.acked > acked_while_full, v
    full = full_events(lab)
    assert full[0]["severity"] == "warning" and full[0]["group"] == "g1", full
    print("\nfill: site B full after %d writes, held a prefix of %d (barrier %d); resumed, "
          "final prefix %d = all acked" % (acked_while_full, held.prefix, held.barrier,
                                           v.prefix))
