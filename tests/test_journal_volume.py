"""``ferry journal-volume``: a group's journal on its own block device (a real loop device
stands in for an LVM logical volume), refusals, and a restart that mounts it again."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest

from agent.errors import NotFound
from agent.target import volume
from tests.conftest import Lab, same_bytes
from tests.test_replication import error_line

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

MiB = 1024 * 1024


def run(*cmd: str, check: bool = True) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, "%s: %s%s" % (" ".join(cmd), proc.stdout, proc.stderr)
    return proc.stdout.strip()


@pytest.fixture
def loops(lab: Lab) -> Iterator[List[str]]:
    """Three loop devices: 64 MiB, 24 MiB and 64 MiB (given an ext4 already)."""
    if os.geteuid() != 0:
        pytest.skip("loop devices need root")
    devices: List[str] = []
    try:
        for name, size in (("big", 64), ("small", 24), ("used", 64)):
            image = lab.work / ("%s.dev" % name)
            with open(image, "wb") as f:
                f.truncate(size * MiB)
            devices.append(run("losetup", "-f", "--show", str(image)))
        run("mkfs.ext4", "-q", "-F", devices[2])
        yield devices
    finally:
        lab.close()
        journal = lab.b.data / "target" / "vm" / "journal"
        while os.path.ismount(journal):
            run("umount", str(journal))
        for d in devices:
            run("losetup", "-d", d, check=False)


def test_journal_volume(lab: Lab, loops: List[str]) -> None:
    big, small, used = loops
    a, b = lab.a, lab.b
    b.start()
    a.start()
    for device, words in ((str(lab.work / "big.dev"), "is not a block device"),
                          (small, "holds 24 MiB; a journal of --journal-max 8 MiB with its "
                                  "reserve needs 36 MiB"),
                          (used, "holds a signature (ext4); wipe it first")):
        line = error_line(b.ferry("journal-volume", "vm", device, "--journal-max", "8M",
                                  check=False))
        assert line.startswith("ferry: error: journal volume %s " % device), line
        assert words in line, line
    held = os.open(big, os.O_RDONLY | os.O_EXCL)   # another program holds it
    try:
        line = error_line(b.ferry("journal-volume", "vm", big, "--journal-max", "8M",
                                  check=False))
        assert "journal volume %s is in use" % big in line, line
    finally:
        os.close(held)
    journal = b.data / "target" / "vm" / "journal"
    assert not os.path.ismount(journal)

    out = json.loads(b.ferry("journal-volume", "vm", big, "--journal-max", "8M",
                             "--json").stdout)
    assert (out["device"], out["size"], out["journal"]) == (big, 64 * MiB, str(journal))
    assert run("findmnt", "-n", "-o", "SOURCE,UUID", "--mountpoint", str(journal)).split() \
        == [big, out["uuid"]]
    line = error_line(b.ferry("journal-volume", "vm", big, "--journal-max", "8M",
                              check=False))
    assert "group vm has a journal volume already (file system %s)" % out["uuid"] in line

    b.stop()   # a restart before the group is protected: the volume waits for it
    b.start()
    assert "vm" not in b.status().get("replicas", {})
    disk = lab.image("d1.img", 16 * MiB)
    uris = lab.protect("vm", disk, extra=("--journal-max", "8M", "--journal-reserve"))
    run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 6M", "-c", "flush", uris["d1"])
    a.ferry("wait", "vm", "--synced", "--timeout", "120")
    names = os.listdir(journal)
    assert any(n.endswith(".fjr") for n in names) and "room.fjs" in names, names
    assert os.stat(journal / names[0]).st_dev == os.stat(journal).st_dev \
        != os.stat(journal.parent).st_dev
    first = lab.restore("vm", "d1")
    assert same_bytes(first, disk)
    line = error_line(b.ferry("journal-volume", "vm", big, "--journal-max", "8M",
                              check=False))
    assert "group vm has a journal" in line, line

    # Mounted again by its UUID when the agent starts and finds it unmounted.
    a.stop()
    b.stop()
    run("umount", str(journal))
    b.start()
    assert os.path.ismount(journal)
    again = lab.work / "again.img"
    b.ferry("restore", "vm", "--disk", "d1", "--to", str(again))
    assert same_bytes(again, disk)
    # A volume that cannot be found: the group is not opened (its journal would go to
    # the wrong file system), with the reason.
    b.stop()
    run("umount", str(journal))
    run("losetup", "-d", big)
    b.start()
    st = b.status()["replicas"]["vm"]
    assert "its journal volume (file system %s, was %s) cannot be mounted" % (
        out["uuid"], big) in st["error"], st
    assert not os.path.ismount(journal) and os.listdir(journal) == []


def test_volume_record_and_checks(tmp_path: Path) -> None:
    data, root = tmp_path, tmp_path / "target"
    (root / "g1" / "journal").mkdir(parents=True)          # empty: maybe a volume
    (root / "g2" / "journal").mkdir(parents=True)
    (root / "g2" / "journal" / "seg-0000000000000001.fjr").write_bytes(b"")
    assert volume.mount_all(str(data), str(root)) == {}    # no record: nothing to mount
    (data / volume.RECORD).write_text("[1, 2]")            # not an object
    failed = volume.mount_all(str(data), str(root))
    assert list(failed) == ["g1"] and "journal-volumes.json cannot be read" in failed["g1"]
    (data / volume.RECORD).write_text(json.dumps({"g3": {
        "uuid": "00000000-0000-4000-8000-000000000001", "device": "/dev/gone"}}))
    failed = volume.mount_all(str(data), str(root))
    assert list(failed) == ["g3"] and "cannot be mounted on %s" % (
        root / "g3" / "journal") in failed["g3"], failed
    with pytest.raises(NotFound, match=r"^journal volume /dev/nosuch does not exist$"):
        volume.check("/dev/nosuch", 8 * MiB)
    assert volume.need(8 * MiB) == int(26 * MiB / 0.94) + 8 * MiB  # reserve, ext4, 8 MiB
