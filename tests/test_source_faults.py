"""EIO on site A's disk (tests/plugins/faulty_disk.py through nbdfuse): failed writes and
flushes reach status, metrics and events for that disk; their ranges are read back once
the device answers; `wait --synced` is never claimed while an error is unresolved; the
replica ends identical to what the source disk really holds."""

from __future__ import annotations

import subprocess
from typing import Iterator

import nbd
import pytest
from conftest import Lab, samples
from faulty_device import FaultyDisk
from test_faults import check_identical, wait_for

SIZE = 16 * 1024 * 1024


@pytest.fixture
def faulty(sites: Lab) -> Iterator[tuple]:
    disk = FaultyDisk(sites.work, SIZE)
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
