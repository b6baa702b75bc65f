"""EIO on site A's disk (tests/plugins/faulty_disk.py through nbdfuse): failed writes and
flushes reach status, metrics and events for that disk; their ranges are read back once
the device answers; `wait --synced` is never claimed while an error is unresolved; the
replica ends identical to what the source disk really holds."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import nbd
import pytest
from conftest import Lab, samples
from test_faults import check_identical, wait_for

PLUGIN = Path(__file__).parent / "plugins" / "faulty_disk.py"
SIZE = 16 * 1024 * 1024


class FaultyDisk:
    """A RAM disk behind nbdkit, as the file ``path`` (nbdfuse); ``fail(op)`` makes op
    (pread, pwrite, flush) fail with EIO until ``heal()``."""

    def __init__(self, work: Path) -> None:
        self.dir = work / "faulty"
        self.triggers = self.dir / "triggers"
        self.mnt = self.dir / "mnt"
        self.triggers.mkdir(parents=True)
        self.mnt.mkdir()
        self.sock = self.dir / "sock"
        self.pidfile = self.dir / "nbdkit.pid"
        subprocess.run(["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile), "python",
                        str(PLUGIN), "size=%d" % SIZE, "dir=%s" % self.triggers], check=True)
        self.fuse = subprocess.Popen(["nbdfuse", str(self.mnt),
                                      "nbd+unix:///?socket=%s" % self.sock])
        self.path = self.mnt / "nbd"
        wait_for(lambda: self.path.exists(), what="nbdfuse to mount")

    def fail(self, *ops: str) -> None:
        for op in ops:
            (self.triggers / op).touch()

    def heal(self) -> None:
        for p in self.triggers.iterdir():
            p.unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.fuse.terminate()
        self.fuse.wait(10)
        if self.pidfile.exists():
            os.kill(int(self.pidfile.read_text()), 15)


@pytest.fixture
def faulty(sites: Lab) -> Iterator[tuple]:
    disk = FaultyDisk(sites.work)
    try:
        yield sites, disk
    finally:
        disk.close()


def disk_status(lab: Lab) -> dict:
    return lab.a.status("g1")["groups"]["g1"]["disks"]["nbd"]


def synced(lab: Lab, seconds: str) -> subprocess.CompletedProcess:
    return lab.a.ferry("wait", "g1", "--synced", "--timeout", seconds, check=False)


def test_failed_writes_are_shown_owed_and_read_back(faulty) -> None:
    lab, disk = faulty
    uri = lab.protect("g1", disk.path)["nbd"]
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"a" * 65536, 0)
    h.flush()
    # The device fails writes and reads: the guest's write fails, and the range cannot be
    # read back yet, so the error stays unresolved.
    disk.fail("pwrite", "pread")
    with pytest.raises(nbd.Error):
        h.pwrite(b"b" * 65536, 1 << 20)
    wait_for(lambda: disk_status(lab)["state"] == "source-io-error",
             what="the disk to show the I/O error")
    st = disk_status(lab)
    assert st["io_errors"] >= 1 and "write of 65536 bytes at 1048576" in st["last_io_error"]
    assert "write of 65536 bytes at 1048576" in st["error"]
    assert lab.a.status("g1")["groups"]["g1"]["state"] == "source-io-error"
    out = synced(lab, "3")
    assert out.returncode != 0, "synced claimed while the disk's error is unresolved"
    m = samples(lab.a.api("GET", "/metrics"))
    key = (("disk", "nbd"), ("group", "g1"))
    assert m[("ferry_io_errors_total", key)] >= 1
    assert m[("ferry_disk_state", (*key, ("state", "source-io-error")))] == 1
    disk.heal()
    wait_for(lambda: disk_status(lab)["state"] == "replicating", timeout=60,
             what="the owed range to be read back")
    assert synced(lab, "60").returncode == 0
    h.pwrite(b"c" * 4096, 2 << 20)
    h.flush()
    h.shutdown()
    check_identical(lab, disk.path, name="nbd")
    events = lab.a.ferry("events", "--json").stdout
    assert "source-io-error" in events, events[-2000:]


def test_a_failed_flush_owes_what_was_written_since_the_last_good_one(faulty) -> None:
    lab, disk = faulty
    uri = lab.protect("g1", disk.path)["nbd"]
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"d" * 65536, 3 << 20)
    wait_for(lambda: disk_status(lab)["bytes_queued"] == 0, what="the write to be acked")
    before = disk_status(lab)["resync_bytes"]
    disk.fail("flush")
    with pytest.raises(nbd.Error):
        h.flush()
    # Acked or not, the write's range is owed again (the device may have lost it) and read
    # back from the disk as it now answers.
    wait_for(lambda: disk_status(lab)["resync_bytes"] >= before + 65536,
             what="the unflushed write to be read back: %s" % disk_status(lab))
    st = disk_status(lab)
    assert st["io_errors"] == 1 and "flush" in st["last_io_error"], st
    disk.heal()
    h.flush()
    h.shutdown()
    check_identical(lab, disk.path, name="nbd")
