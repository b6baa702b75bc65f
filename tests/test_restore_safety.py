"""Restores that cannot be redirected, and restores anywhere (issues 18 and 19).

Real agents: a name planted at the destination (symlink, dangling symlink, hard link, FIFO)
is refused and what it points to is untouched; a protected disk and the agent's data
directory are refused; a restore to another file system (tmpfs, mounted here: we are root)
after the data was promoted into the replica is byte-exact; a restore that runs out of space
or meets a read-only file system fails in one line and leaves nothing behind.
"""

from __future__ import annotations

import errno
import os
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest
from conftest import Lab, first_difference, same_bytes
from test_replica import accept, consistent, open_group, w

from agent.errors import Conflict, StorageError
from agent.target import restore as restore_mod

MiB = 1 << 20

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounts tmpfs: needs root")


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def restore_cmd(lab: Lab, dest: Path) -> subprocess.CompletedProcess:
    return lab.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest), check=False)


@pytest.fixture
def promoted(sites: Lab) -> Lab:
    """Group g1 (one 8 MiB disk of random bytes, 1 s of history) synced, and its data
    promoted from the journal into B's replica."""
    disk = sites.image("vda.img", 8 * MiB)
    with open(disk, "r+b") as f:
        f.write(os.urandom(6 * MiB))
    sites.protect("g1", disk, extra=("--history", "1s"))
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    replica = sites.b.data / "target" / "g1" / "replicas" / "vda.img"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        st = sites.b.status("g1")["replicas"]["g1"]["disks"]["vda"]
        if st["applied_seq"] > 0 and replica.stat().st_blocks * 512 >= 6 * MiB:
            break
        time.sleep(0.5)
    else:
        raise AssertionError("nothing was promoted into the replica: %s" % st)
    return sites


@pytest.fixture
def mounts(tmp_path: Path) -> Iterator[list]:
    """Mount points made with ``mount(tmp_path / name, options)``, unmounted at the end."""
    made: list = []

    def mount(name: str, options: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                       check=True)
        made.append(point)
        return point
    try:
        yield [mount]
    finally:
        for point in made:
            subprocess.run(["umount", "-l", str(point)], check=False)


@pytest.mark.parametrize("plant", ["symlink", "dangling", "hardlink", "fifo"])
def test_a_name_planted_at_the_destination_is_refused(promoted: Lab, plant: str) -> None:
    victim = promoted.work / "victim"
    victim.write_bytes(b"the host's precious file")
    dest = promoted.work / "vm.img"
    if plant == "symlink":
        dest.symlink_to(victim)
    elif plant == "dangling":
        dest.symlink_to(promoted.work / "not-yet")
    elif plant == "hardlink":
        os.link(victim, dest)
    else:
        os.mkfifo(dest)
    line = error_line(restore_cmd(promoted, dest))
    assert "already exists" in line and str(dest) in line
    assert victim.read_bytes() == b"the host's precious file"
    assert not (promoted.work / "not-yet").exists()
    if plant in ("symlink", "dangling"):
        assert dest.is_symlink()
    assert sorted(p.name for p in promoted.work.iterdir()) == sorted(
        ["vda.img", "victim", "vm.img"])


def test_a_protected_disk_or_the_data_directory_is_refused(promoted: Lab) -> None:
    disk = promoted.work / "vda.img"
    before = disk.stat().st_mtime_ns
    # B's agent protects a disk of its own (roles, not places): it is never a destination.
    mine = promoted.image("mine.img", 1 * MiB)
    proc = promoted.b.ferry("protect", "b1", "--disk", "vdb=%s" % mine, "--target",
                            promoted.a.address)
    assert proc.returncode == 0
    line = error_line(restore_cmd(promoted, mine))
    assert "protected group b1" in line, line
    line = error_line(restore_cmd(promoted, promoted.b.data / "x.img"))
    assert "data directory" in line, line
    assert not (promoted.b.data / "x.img").exists()
    assert disk.stat().st_mtime_ns == before


def test_restore_to_another_file_system_after_promotion(promoted: Lab, mounts: list) -> None:
    mnt = mounts[0]("big", "size=64m")
    dest = mnt / "vda.img"
    restore_cmd(promoted, dest).check_returncode()
    src = promoted.work / "vda.img"
    assert same_bytes(src, dest), first_difference(src, dest)
    assert dest.stat().st_size == 8 * MiB
    assert dest.stat().st_blocks * 512 < 7 * MiB  # the hole at the end stayed a hole
    assert sorted(os.listdir(mnt)) == ["vda.img"]


def test_a_full_destination_fails_in_one_line_and_leaves_nothing(promoted: Lab,
                                                                  mounts: list) -> None:
    mnt = mounts[0]("small", "size=1m")
    dest = mnt / "vda.img"
    proc = restore_cmd(promoted, dest)
    line = error_line(proc)
    assert "No space left" in line and str(dest) in line, line
    assert os.listdir(mnt) == []
    # The agent is unharmed: a restore with room works after it.
    ok = promoted.work / "after.img"
    restore_cmd(promoted, ok).check_returncode()
    assert same_bytes(promoted.work / "vda.img", ok)


def test_a_read_only_destination_fails_in_one_line(promoted: Lab, mounts: list) -> None:
    mnt = mounts[0]("ro", "size=64m,ro")
    line = error_line(restore_cmd(promoted, mnt / "vda.img"))
    assert "Read-only file system" in line, line
    assert os.listdir(mnt) == []


def test_a_directory_swapped_under_the_restore_is_refused(tmp_path: Path) -> None:
    g = open_group(tmp_path / "g", [("a", 1 * MiB)])
    accept(g, [w(1, 0, b"x" * 4096), consistent(2)])
    real = tmp_path / "real" / "sub"
    real.mkdir(parents=True)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    # What check_dest would have resolved, then a link appeared in its place.
    dest = str(tmp_path / "link" / "sub" / "x.img")
    with pytest.raises(Conflict, match="directory was replaced"):
        g.restore("a", dest)
    assert os.listdir(real) == []
    g.close()


def test_an_unknown_failure_is_a_storage_error_naming_the_file() -> None:
    e = restore_mod.dest_error("restore of group g disk a to /x",
                               OSError(errno.EIO, "Input/output error", "/x"))
    assert isinstance(e, StorageError) and e.errno == errno.EIO
    assert str(e) == ("restore of group g disk a to /x failed: /x: Input/output error; "
                      "nothing was left behind")


def test_a_name_too_long_fails_in_one_line(promoted: Lab) -> None:
    line = error_line(restore_cmd(promoted, promoted.work / ("x" * 300)))
    assert "File name too long" in line, line
    assert sorted(p.name for p in promoted.work.iterdir()) == ["vda.img"]
