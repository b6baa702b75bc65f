"""A protected disk that grows is replicated grown (issue 11; agent/source/resize.py): a loop
device over a file extended and ``losetup -c``, then ``ferry resize``; site B's replica grows,
the new tail (data the splitter never saw written) is synced, points from before the growth
keep the old size; shrinking is refused, nothing written. Real agents, real loop devices."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import List

import nbd
import pytest
from conftest import Lab
from test_udev_identity import _attach, _file, loops, wait_problem

from agent.errors import EXIT_CONFLICT, EXIT_NOT_FOUND

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

MiB = 1024 * 1024
__all__ = ["loops"]  # the fixture, used by name


def _restore(lab: Lab, *point: str) -> Path:
    dest = lab.work / ("restored-%d.img" % time.monotonic_ns())
    lab.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest), *point)
    return dest


def test_a_grown_loop_device_is_replicated_grown_and_a_shrunk_one_refused(
        sites: Lab, loops: List[str]) -> None:
    lab = sites
    backing = _file(lab.work / "vda.img", 8 * MiB)
    dev = _attach(backing)
    loops.append(dev)
    uri = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % dev, "--target",
                      lab.b.address).stdout.strip().split("\t")[1]
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"A" * 65536, 0)
    h.pwrite(b"B" * 4096, 8 * MiB - 4096)
    h.flush()
    h.shutdown()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    lab.a.ferry("checkpoint", "g1", "--tag", "before")
    before = backing.read_bytes()
    # Extended the way an LV is: the new tail holds bytes the splitter never saw written.
    with open(backing, "r+b") as f:
        f.truncate(12 * MiB)
        f.seek(9 * MiB)
        f.write(os.urandom(MiB))
    subprocess.run(["losetup", "-c", dev], check=True)
    problem = wait_problem(lab, "grown")
    assert problem.endswith("replicates %d bytes until ferry resize g1 --disk vda" % (8 * MiB))
    # Its splitter restarted (killed) before ferry resize: served at the size protected,
    # replication goes on (site B would refuse records past the old end).
    lab.a.kill_splitters(signal.SIGKILL)
    wait_splitter(lab)
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == 8 * MiB
    h.pwrite(b"D" * 4096, 4096)
    h.flush()
    h.shutdown()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    # A client on its splitter (a running VM): qemu would not reconnect to a new size.
    pids = lab.a.splitter_pids()
    vm = nbd.NBD()
    vm.connect_uri(uri)
    proc = lab.a.ferry("resize", "g1", "--disk", "vda", check=False)
    assert proc.returncode == EXIT_CONFLICT and proc.stderr.strip().splitlines() == [
        "ferry: error: disk g1/vda: its splitter has 1 client connected (a running VM): "
        "qemu does not reconnect to an export whose size changed, so its I/O would fail; "
        "shut the VM down, then resize again; until then %d bytes are replicated" % (8 * MiB)]
    assert lab.a.splitter_pids() == pids and vm.get_size() == 8 * MiB
    vm.pread(512, 0)  # its connection untouched
    vm.shutdown()
    time.sleep(0.5)  # nbdkit closes its end
    out = lab.a.ferry("resize", "g1", "--disk", "vda").stdout
    assert "g1/vda: grown from %d to %d bytes" % (8 * MiB, 12 * MiB) in out, out
    assert lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]["size"] == 12 * MiB
    logs = "".join(p.read_text() for p in (lab.a.data / "disks").glob("*.log"))
    assert "disk grew from %d to %d bytes" % (8 * MiB, 12 * MiB) in logs  # the tail, not all
    h = nbd.NBD()
    h.connect_uri(uri)
    assert h.get_size() == 12 * MiB
    h.pwrite(b"C" * 8192, 11 * MiB)  # a write past the old end, through the splitter
    h.flush()
    h.shutdown()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    lab.a.ferry("checkpoint", "g1", "--tag", "after")
    deadline = time.monotonic() + 30  # the device problem cleared
    while lab.a.status("g1")["groups"]["g1"]["disks"]["vda"].get("device_problem"):
        assert time.monotonic() < deadline
        time.sleep(0.3)
    after = backing.read_bytes()
    assert _restore(lab, "--checkpoint", "after").read_bytes() == after
    old = _restore(lab, "--checkpoint", "before").read_bytes()
    assert len(old) == 8 * MiB and old == before  # the size it had then
    view = lab.b.api("POST", "/v1/replicas/g1/views", {"checkpoint": "before"})
    try:
        v = nbd.NBD()
        v.connect_uri(view["disks"]["vda"])
        assert v.get_size() == 8 * MiB
        v.shutdown()
    finally:
        lab.b.api("DELETE", "/v1/views/%s" % view["id"])
    meta = json.loads((lab.b.data / "target" / "g1" / "meta.json").read_text())
    assert meta["disks"][0]["size"] == 12 * MiB and meta["disks"][0]["grown"][0][2] == 8 * MiB
    # The same size again: nothing to do, nothing restarted.
    pids = lab.a.splitter_pids()
    same = json.loads(lab.a.ferry("resize", "g1", "--disk", "vda", "--json").stdout)
    assert same["resized"] is False and lab.a.splitter_pids() == pids
    proc = lab.a.ferry("resize", "g1", "--disk", "nosuch", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "group g1 has no disk nosuch" in proc.stderr
    # Shrunk: refused in one line naming the disk and both sizes; nothing restarted or written.
    with open(backing, "r+b") as f:
        f.truncate(10 * MiB)
    subprocess.run(["losetup", "-c", dev], check=True)
    shrunk = backing.read_bytes()
    assert wait_problem(lab, "shrunk").endswith("(shrinking is refused)")
    proc = lab.a.ferry("resize", "g1", "--disk", "vda", check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "disk g1/vda: %s is %d bytes now, smaller than the %d bytes " \
        "protected: shrinking is refused" % (dev, 10 * MiB, 12 * MiB) in lines[0], lines
    assert lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]["size"] == 12 * MiB
    assert lab.a.splitter_pids() == pids and backing.read_bytes() == shrunk
    # Nor does its splitter serve it shrunk when it starts again.
    lab.a.kill_splitters(signal.SIGKILL)
    deadline = time.monotonic() + 60
    while "smaller than the %d bytes protected: not served" % (12 * MiB) not in \
            lab.a.log.read_text():
        assert time.monotonic() < deadline, lab.a.log.read_text()[-2000:]
        time.sleep(0.3)
    assert not lab.a.splitter_pids() and backing.read_bytes() == shrunk


def wait_splitter(lab: Lab, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not lab.a.splitter_pids():
        assert time.monotonic() < deadline, "the supervisor did not restart the splitter"
        time.sleep(0.2)


class _Site:
    """A source site as ``resize`` uses it, its splitter failing to start again."""

    def __init__(self, tmp: Path, disk: Path) -> None:
        from agent.source.splitters import Fleet
        from agent.store import DiskRow, GroupRow
        self.row = GroupRow("g1", "b:4005", "p", 1 << 20, 0.0,
                            [DiskRow("d1", "g1", 0, "vda", str(disk), 4 * MiB)])
        self.store = self
        self.shippers = {"g1": object()}
        self._busy: set = set()
        self.fleet = Fleet(str(tmp), str(tmp / "splitter.sock"))
        self.fleet.start_one = self._fail  # type: ignore[method-assign]

    def group(self, name: str) -> object:
        return self.row

    def set_disk_size(self, disk_id: str, size: int) -> None:
        import dataclasses
        self.row = dataclasses.replace(self.row, disks=[
            dataclasses.replace(self.row.disks[0], size=size)])

    def _inspect(self, dname: str, path: str) -> object:
        from formats import images
        return images.inspect(path)

    def _stop_group(self, row: object) -> None:
        pass

    def _start_group(self, row: object) -> None:
        pass

    def _fail(self, row: object, d: object) -> None:
        from agent.source.splitters import SplitterError
        raise SplitterError("nbdkit for x failed to start (exit 1)")


def test_a_busy_group_and_a_splitter_that_does_not_start_again_are_named(tmp_path: Path
                                                                          ) -> None:
    import pytest
    import trio

    from agent.errors import Conflict, Unavailable
    from agent.source.resize import resize
    disk = _file(tmp_path / "vda.img", 6 * MiB)
    site = _Site(tmp_path, disk)
    site._busy.add("g1")
    with pytest.raises(Conflict, match="group g1 is busy"):
        trio.run(resize, site, "g1", "vda")
    site._busy.clear()
    with pytest.raises(Unavailable, match="group g1 disk vda: its splitter did not start "
                                          "again: nbdkit for x failed"):
        trio.run(resize, site, "g1", "vda")
    assert site.row.disks[0].size == 6 * MiB and not site._busy  # stored; supervisor retries


def test_a_replica_device_smaller_than_the_grown_disk_is_named(tmp_path: Path,
                                                               loops: List[str]) -> None:
    import pytest

    from agent.target.group import SizeMismatch, TargetGroup
    directory = tmp_path / "g1"
    g = TargetGroup(str(directory), "g1", [("vda", 4 * MiB)], protection="p")
    assert not g.grows([("vda", 2 * MiB)]) and not g.grows([("vdb", 8 * MiB)])
    assert not g.grows([("vda", 4 * MiB)]) and g.grows([("vda", 8 * MiB)])
    g.close()
    dev = _attach(_file(tmp_path / "replica.img", 4 * MiB))
    loops.append(dev)
    replica = directory / "replicas" / "vda.img"
    replica.unlink()
    replica.symlink_to(dev)
    g = TargetGroup.reopen(str(directory), "g1")
    assert g is not None
    with pytest.raises(SizeMismatch, match="group g1 disk vda: the source's disk grew to %d "
                       "bytes; the replica .* is a device of %d bytes: grow it first"
                       % (8 * MiB, 4 * MiB)):
        g.grow([("vda", 8 * MiB)])
    assert g.disks[0].size == 4 * MiB and g.disks[0].size_at((0, 0)) == 4 * MiB
    g.close()


def test_a_clean_state_on_a_grown_disk_owes_its_ranges_and_the_new_tail(tmp_path: Path
                                                                         ) -> None:
    from nbd_plugin import state
    path = str(tmp_path / "d.state.json")
    state.save(path, 5, 8 * MiB, clean=True, dirty=[(0, 4096)])
    loaded = state.load(path, 12 * MiB)
    assert loaded.dirty == [(0, 4096), (8 * MiB, 4 * MiB)] and "grew" in loaded.reason
    state.save(path, loaded.gen, 12 * MiB, clean=True, dirty=[])
    assert state.load(path, 10 * MiB).dirty is None  # shrunk: the whole disk
