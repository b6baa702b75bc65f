"""EIO under site B's data directory (nbdkit plugin failing on purpose -> nbdfuse -> loop
device -> ext4 mounted as B's data directory): B's status names the file and the errno for
the group, site A shows `target-storage-error`, the writer on A is unharmed, and once the
device answers again the group converges."""

from __future__ import annotations

import errno
import time
from typing import Iterator

import pytest
from conftest import Lab, first_difference, same_bytes
from faulty_device import FaultyDisk, FaultyFs
from test_faults import wait_for
from test_integrity import protected, synced
from test_repair_integrity import Writer

MiB = 1024 * 1024


@pytest.fixture
def b_on_faulty(lab: Lab) -> Iterator[tuple]:
    disk = FaultyDisk(lab.work, 160 * MiB)
    fs = FaultyFs(disk, lab.b.data)
    try:
        lab.b.start()
        lab.a.start()
        yield lab, disk
    finally:
        lab.a.stop()
        lab.b.stop()
        disk.heal()
        fs.close()
        disk.close()


def test_eio_under_b_is_named_in_its_status_and_the_group_converges(b_on_faulty) -> None:
    lab, disk = b_on_faulty
    src, uri = protected(lab, "g1")
    writer = Writer(uri, 31)
    try:
        time.sleep(1)
        disk.fail("pwrite", "flush")
        failed_at = time.monotonic()

        def named() -> bool:
            st = lab.b.status()["replicas"]["g1"]
            return st.get("storage_error") is not None

        wait_for(named, 60, what="B's status to show the storage error")
        st = lab.b.status()["replicas"]["g1"]
        err = st["storage_error"]
        assert err["file"].startswith(str(lab.b.data / "target" / "g1")), err
        assert err["errno"] == errno.EIO and err["errno_name"] == "EIO", err
        assert st["state"] == "storage-error" and err["file"] in st["error"], st
        wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"]
                 == "target-storage-error", 60, what="A to show target-storage-error")
        assert "storage error: %s" % err["file"] in lab.b.log.read_text()
        writes = writer.writes
        time.sleep(max(2.0, 6 - (time.monotonic() - failed_at)))  # EIO for 6 s at least
        assert writer.writes > writes and writer.thread.is_alive(), "the writer was harmed"
        disk.heal()
        healed_at = time.monotonic()
        wait_for(lambda: lab.b.status()["replicas"]["g1"]["storage_error"] is None, 120,
                 what="B to take batches again: %s" % lab.b.status()["replicas"]["g1"])
        print("EIO for %.1f s; B took batches again %.1f s after the device answered"
              % (healed_at - failed_at, time.monotonic() - healed_at))
    finally:
        writer.stop()
    assert writer.writes
    synced(lab, "g1")
    restored = lab.restore("g1", "g1-vda")
    assert same_bytes(src, restored), first_difference(src, restored)
    assert lab.b.status()["replicas"]["g1"]["state"] == "receiving"


def test_an_append_that_fails_and_cannot_be_cut_back_is_cut_before_the_next(
        tmp_path, monkeypatch) -> None:
    import os

    from agent.target.journal import Journal, JRecord
    from formats.records import KIND_WRITE

    j = Journal(str(tmp_path), group="g1", disks=["vda"])
    j.append([JRecord(0, 1, 1, KIND_WRITE, 0, 0, 10, 1, b"a" * 10)])
    size = j.end[1]
    real_sync, real_cut = os.fdatasync, os.ftruncate

    def eio(*_a: object) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fdatasync", eio)
    monkeypatch.setattr(os, "ftruncate", eio)
    with pytest.raises(OSError) as e:
        j.append([JRecord(0, 1, 2, KIND_WRITE, 0, 0, 10, 2, b"b" * 10)])
    assert e.value.errno == errno.EIO and e.value.filename == j.path(1)
    assert os.path.getsize(j.path(1)) > size  # the partial batch is still there
    with pytest.raises(OSError) as e:  # the cut is tried first, and fails again
        j.append([JRecord(0, 1, 2, KIND_WRITE, 0, 0, 10, 2, b"b" * 10)])
    assert e.value.filename == j.path(1)
    monkeypatch.setattr(os, "fdatasync", real_sync)
    monkeypatch.setattr(os, "ftruncate", real_cut)
    j.append([JRecord(0, 1, 2, KIND_WRITE, 0, 0, 10, 2, b"b" * 10)])
    assert j.end[1] == 2 * size and os.path.getsize(j.path(1)) == 2 * size
    j.close()


def test_a_meta_json_that_cannot_be_written_is_named(tmp_path) -> None:
    from agent.target import meta

    (tmp_path / "meta.json").mkdir()  # a directory where it goes: the rename fails
    with pytest.raises(OSError) as e:
        meta.save(str(tmp_path), {"group": "g"})
    assert e.value.filename is not None and "meta.json" in e.value.filename
