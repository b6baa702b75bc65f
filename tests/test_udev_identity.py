"""A protected block device's stable identity (issue 11; agent/devices.py), with loop devices:
another backing file behind the same loop path is refused, never written; a resized
device and a vanished one show in status with their cause."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator, List

import pytest
from conftest import Lab

from agent import devices
from agent.errors import StorageError

MiB = 1024 * 1024


def _file(path: Path, size: int, fill: bytes = b"") -> Path:
    with open(path, "wb") as f:
        f.write(fill)
        f.truncate(size)
    return path


def _attach(backing: Path, dev: str = "") -> str:
    args = ["losetup", dev, str(backing)] if dev else ["losetup", "--find", "--show",
                                                       str(backing)]
    proc = subprocess.run(args, capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("no loop device here: %s" % proc.stderr.strip())
    return dev or proc.stdout.strip()


@pytest.fixture
def loops() -> Iterator[List[str]]:
    made: List[str] = []
    yield made
    for dev in made:
        subprocess.run(["losetup", "-d", dev], check=False, capture_output=True)


def test_a_loop_device_is_known_by_its_backing_file(tmp_path: Path, loops: List[str]) -> None:
    one, two = _file(tmp_path / "one.img", 4 * MiB), _file(tmp_path / "two.img", 4 * MiB)
    dev = _attach(one)
    loops.append(dev)
    ident = devices.describe(dev)
    assert ident is not None
    st = os.stat(one)
    assert ident["loop_backing"] == [st.st_dev, st.st_ino] and ident["size"] == 4 * MiB
    assert ident["backing_file"] == str(one)
    assert devices.describe(str(one)) is None  # a file: its inode is its identity
    subprocess.run(["losetup", "-d", dev], check=True)
    _attach(two, dev)
    why = devices.differs(ident, devices.describe(dev) or {})
    assert why is not None and str(two) in why and str(one) in why
    assert devices.differs(ident, dict(ident, size=8 * MiB, by_id=["x"])) is None  # resized
    assert devices.differs(dict(ident, by_id=["a"]), dict(ident, by_id=["b"])) is not None
    assert devices.differs(dict(ident, by_id=["a"]), ident) is None  # no udev database now


def test_without_udev_sysfs_and_the_poll_do() -> None:
    assert devices._udev(os.makedev(4095, 4095)) == {}  # no such device: nothing from udev
    assert devices._monitor("nosuch") is None
    monitor = devices._monitor()
    assert monitor is not None and monitor.fileno() >= 0


def test_a_device_record_that_cannot_be_read_is_named(tmp_path: Path) -> None:
    (tmp_path / "disks").mkdir()
    (tmp_path / "disks" / "d1.device.json").write_text("{")
    with pytest.raises(StorageError, match=r"device record .*d1\.device\.json"):
        devices.load(str(tmp_path), "d1")
    watch = devices.DeviceWatch(str(tmp_path), lambda: [])
    watch.check([("d1", "g/vda", "/dev/null", 1)])
    assert "cannot be read" in watch.problems["d1"]


def test_another_device_behind_the_same_loop_path_is_refused_and_resizes_show(
        sites: Lab, loops: List[str]) -> None:
    lab = sites
    protected = _file(lab.work / "protected.img", 8 * MiB)
    dev = _attach(protected)
    loops.append(dev)
    lab.a.ferry("protect", "g1", "--disk", "vda=%s" % dev, "--target", lab.b.address)
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    # Grown under the running splitter: shown with its cause, the group keeps its size.
    with open(protected, "r+b") as f:
        f.truncate(12 * MiB)
    subprocess.run(["losetup", "-c", dev], check=True)
    problem = wait_problem(lab, "grown")
    assert "%d bytes now, %d protected" % (12 * MiB, 8 * MiB) in problem, problem
    assert "DEVICE grown" in lab.a.ferry("status").stdout
    # Another backing file behind the same loop path, while the agent is down.
    lab.a.stop()
    lab.a.kill_splitters()
    subprocess.run(["losetup", "-d", dev], check=True)
    other = _file(lab.work / "other.img", 8 * MiB, b"someone else's data")
    before = other.read_bytes()
    _attach(other, dev)
    lab.a.start()
    problem = wait_problem(lab, "replaced")
    assert "backing file is another file now (%s, was %s)" % (other, protected) in problem
    time.sleep(1)
    assert not lab.a.splitter_pids()  # its splitter was refused: nothing written
    assert other.read_bytes() == before
    line = next(x for x in lab.a.log.read_text().splitlines()
                if "is not the device protected" in x)
    assert "disk vda: %s is not the device protected" % dev in line, line
    # Gone: the loop device detached.
    subprocess.run(["losetup", "-d", dev], check=True)
    problem = wait_problem(lab, "gone")
    assert "%s: its loop device has no backing file now (detached; was %s)" % (dev, protected) \
        in problem, problem


def wait_problem(lab: Lab, word: str, timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    while True:
        disk = lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]
        problem = disk.get("device_problem") or ""
        if problem.startswith(word):
            return str(problem)
        assert time.monotonic() < deadline, disk
        time.sleep(0.3)
