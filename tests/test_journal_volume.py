"""``ferry journal-volume``: a group's journal on its own block device (a real loop device
stands in for an LVM logical volume), refusals, and a restart that mounts it again."""

from __future__ import annotations

import errno
import json
import os
import subprocess
from pathlib import Path
from typing import Iterator, List

import pytest

from agent.errors import Invalid, NotFound, StorageError
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
    os.mkfifo(lab.work / "fifo")
    b.start()
    a.start()
    for device, words in ((str(lab.work / "big.dev"), "is in use (attached to /dev/loop"),
                          (str(lab.work / "fifo"), "is neither a block device nor a container "
                                                   "file"),
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
    (data / volume.RECORD).write_text(json.dumps({"g4": {
        "uuid": "00000000-0000-4000-8000-000000000002", "device": str(tmp_path / "gone.raw"),
        "kind": "file", "file": str(tmp_path / "gone.raw"), "size": 64 * MiB}}))
    failed = volume.mount_all(str(data), str(root))
    assert list(failed) == ["g4"] and "gone.raw) does not exist" in failed["g4"], failed
    # Entries read back damaged: named, nothing mounted; a name that is no group ignored.
    (data / volume.RECORD).write_text(json.dumps({
        "g5": {"kind": "file", "uuid": "u", "device": "d"}, "g6": "x",
        "g7": {"uuid": 7, "device": "d"}, "../../etc": {"uuid": "u", "device": "d"}}))
    failed = volume.mount_all(str(data), str(root))
    assert sorted(failed) == ["g5", "g6", "g7"], failed
    assert "is damaged (file is missing or not a str)" in failed["g5"]
    assert "is damaged (not an object)" in failed["g6"]
    assert "is damaged (uuid is missing or not a str)" in failed["g7"]
    assert not (tmp_path.parent / "etc").exists() and not (root / "g5").exists()
    released = volume.release(str(data), str(root / "g6"), "g6")   # forgotten, no unmount
    assert released["released"] and "g6" not in volume.load(str(data))
    with pytest.raises(NotFound, match=r"^journal volume /dev/nosuch does not exist$"):
        volume.check("/dev/nosuch", 8 * MiB)
    assert volume.need(8 * MiB) == int(26 * MiB / 0.94) + 8 * MiB  # reserve, ext4, 8 MiB


def allocated(path: Path) -> int:
    return os.stat(path).st_blocks * 512


def loop_of(path: Path) -> List[str]:
    return run("losetup", "-n", "-O", "NAME", "-j", str(path)).split()


def test_journal_volume_in_a_container_file(lab: Lab) -> None:
    """A raw file and a monolithicFlat VMDK as volumes: refusals, allocation, a group's
    journal on one, a restart that allocates and mounts it again, and --release."""
    if os.geteuid() != 0:
        pytest.skip("loop mounts need root")
    a, b = lab.a, lab.b
    raw = lab.work / "journal.raw"
    with open(raw, "wb") as f:
        f.truncate(64 * MiB)                       # sparse: Ferry allocates it
    journal = b.data / "target" / "vm" / "journal"
    spare_journal = b.data / "target" / "spare" / "journal"
    try:
        b.start()
        a.start()
        refusals(lab)

        out = json.loads(b.ferry("journal-volume", "vm", str(raw), "--journal-max", "8M",
                                 "--json").stdout)
        assert (out["kind"], out["container"], out["size"]) == ("file", "raw", 64 * MiB), out
        assert allocated(raw) >= 64 * MiB
        assert run("findmnt", "-n", "-o", "UUID", "--mountpoint", str(journal)) == out["uuid"]
        assert len(loop_of(raw)) == 1
        line = error_line(b.ferry("journal-volume", "other", str(raw), "--journal-max",
                                  "8M", check=False))
        assert "journal volume %s is in use (attached to /dev/loop" % raw in line, line

        disk = lab.image("d1.img", 16 * MiB)
        uris = lab.protect("vm", disk, extra=("--journal-max", "8M", "--journal-reserve"))
        run("qemu-io", "-f", "raw", "-c", "write -P 0x6b 0 6M", "-c", "flush", uris["d1"])
        a.ferry("wait", "vm", "--synced", "--timeout", "120")
        assert any(n.endswith(".fjr") for n in os.listdir(journal))
        line = error_line(b.ferry("journal-volume", "vm", "--release", check=False))
        assert "group vm is held on this site" in line, line

        # fstrim gives the volume's free blocks back to the file system below; a restart
        # allocates them again, and mounts the file only while it holds the volume.
        a.stop()
        b.stop()
        run("fstrim", str(journal))
        run("umount", str(journal))
        assert loop_of(raw) == []                  # mount -o loop: detached at unmount
        assert allocated(raw) < 64 * MiB           # the loop device punched holes
        b.start()
        assert os.path.ismount(journal) and allocated(raw) >= 64 * MiB
        again = lab.work / "again.img"
        b.ferry("restore", "vm", "--disk", "d1", "--to", str(again))
        assert same_bytes(again, disk)
        b.stop()
        run("umount", str(journal))
        run("mkfs.ext4", "-q", "-F", str(raw))     # another file system in the file now
        b.start()
        st = b.status()["replicas"]["vm"]
        assert "holds file system" in st["error"] and "not the volume's file system" \
            in st["error"], st
        assert not os.path.ismount(journal)

        # A VMDK container for another group, given back before it is protected.
        vmdk = lab.work / "spare.vmdk"
        run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
            str(vmdk), "48M")
        out = json.loads(b.ferry("journal-volume", "spare", str(vmdk), "--journal-max", "8M",
                                 "--json").stdout)
        flat = lab.work / "spare-flat.vmdk"
        assert (out["container"], out["file"], out["size"]) == ("vmdk", str(flat), 48 * MiB)
        assert allocated(flat) >= 48 * MiB and os.path.ismount(spare_journal)
        assert run("qemu-img", "info", "--output=json", str(vmdk)).count('"vmdk"') >= 1
        (spare_journal / "stray").write_bytes(b"x")
        line = error_line(b.ferry("journal-volume", "spare", "--release", check=False))
        assert "holds 1 journal file(s) (stray...)" in line, line
        (spare_journal / "stray").unlink()
        done = b.ferry("journal-volume", "spare", "--release").stdout
        assert "group spare: journal volume %s unmounted and forgotten" % vmdk in done, done
        assert not spare_journal.parent.exists() and loop_of(flat) == []
        assert "spare" not in volume.load(str(b.data))
        line = error_line(b.ferry("journal-volume", "spare", "--release", check=False))
        assert "group spare has no journal volume" in line, line
        # The volume whose file system went away is forgotten too (the group is held:
        # refused), and a usage error says what --release takes.
        line = error_line(b.ferry("journal-volume", "vm", "--release", check=False))
        assert "group vm is held on this site" in line, line
        line = error_line(b.ferry("journal-volume", "x", str(vmdk), "--release",
                                  check=False))
        assert "--release takes the group alone" in line, line
    finally:
        lab.close()
        for j in (journal, spare_journal):
            while os.path.ismount(j):
                run("umount", str(j))


def refusals(lab: Lab) -> None:
    """Container files refused in one line, nothing written to them."""
    b, work = lab.b, lab.work
    small = work / "small.raw"
    small.write_bytes(b"\0" * (24 * MiB))
    signed = work / "signed.raw"
    with open(signed, "wb") as f:
        f.truncate(64 * MiB)
    run("mkfs.ext4", "-q", "-F", str(signed))
    link = work / "link.raw"
    link.symlink_to(signed)
    qcow = work / "j.qcow2"
    run("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "64M")
    sparse_vmdk = work / "sparse.vmdk"
    run("qemu-img", "create", "-q", "-f", "vmdk", str(sparse_vmdk), "64M")
    outside = Path("/var/tmp") / ("ferry-test-%d.raw" % os.getpid())
    outside.write_bytes(b"")
    short = work / "short.vmdk"   # its flat extent shorter than the disk it describes
    run("qemu-img", "create", "-q", "-f", "vmdk", "-o", "subformat=monolithicFlat",
        str(short), "64M")
    os.truncate(work / "short-flat.vmdk", 32 * MiB)
    tight = work / "tight"        # a file system without the room to allocate the file
    tight.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=40m", "tmpfs", str(tight))
    roomless = tight / "journal.raw"
    with open(roomless, "wb") as f:
        f.truncate(64 * MiB)
    try:
        cases = (
            (small, "holds 24 MiB; a journal of --journal-max 8 MiB with its reserve "
                    "needs 36 MiB"),
            (signed, "holds a signature (ext4); wipe it first"),
            (link, "is a symbolic link; give the file itself"),
            (qcow, "is a qcow2 image: a journal volume is a block device, or a raw or "
                   "monolithicFlat VMDK container file"),
            (sparse_vmdk, "only a monolithicFlat VMDK has its bytes in one plain file"),
            (outside, "is outside the image roots"),
            (work / "nosuch.raw", "does not exist"),
            (short, "its flat extent %s is shorter than the disk it describes"
                    % (work / "short-flat.vmdk")),
            (roomless, "the file system holding it has not the space to allocate its 64 "
                       "MiB (No space left on device)"),
        )
        for path, words in cases:
            before = path.read_bytes() if path.is_file() and not path.is_symlink() else None
            line = error_line(b.ferry("journal-volume", "vm", str(path), "--journal-max",
                                      "8M", check=False))
            assert line.startswith("ferry: error: journal volume %s" % path), line
            assert words in line, line
            if before is not None:
                assert path.read_bytes() == before, path
        assert not (b.data / "target" / "vm" / "journal").exists() or \
            not os.path.ismount(b.data / "target" / "vm" / "journal")
        # A disk a group protects on this site cannot be a journal volume.
        protected = lab.image("p1.img", 64 * MiB)
        lab.a.ferry("protect", "pg", "--disk", "p1=%s" % protected, "--target",
                    lab.b.address)
        line = error_line(lab.a.ferry("journal-volume", "vm", str(protected),
                                      "--journal-max", "8M", check=False))
        assert "journal volume %s is disk p1 of protected group pg" % protected in line, line
        lab.a.ferry("unprotect", "pg")
    finally:
        outside.unlink()
        run("umount", str(tight))


def test_container_refusals_the_kernel_makes(tmp_path: Path) -> None:
    """Errors other than a link or no space: each is one line and changes nothing."""
    # A file that is a running program cannot be opened for writing (ETXTBSY).
    prog = tmp_path / "sleeper"
    prog.write_bytes(Path("/bin/sleep").read_bytes())
    prog.chmod(0o755)
    proc = subprocess.Popen([str(prog), "30"])
    try:
        with pytest.raises(Invalid, match=r"^journal volume %s: Text file busy$" % prog):
            volume._open_file("journal volume %s" % prog, str(prog), None)
    finally:
        proc.kill()
        proc.wait()
    # A descriptor that cannot be allocated (a pipe: ESPIPE): a storage error with errno.
    r, w = os.pipe()
    try:
        with pytest.raises(StorageError, match=r"^vol: allocating it: Illegal seek$") as e:
            volume.allocate("vol", w, MiB)
        assert e.value.errno == errno.ESPIPE
    finally:
        os.close(r)
        os.close(w)


def test_release_leaves_a_group_directory_that_is_not_empty(tmp_path: Path) -> None:
    data, group_dir = tmp_path, tmp_path / "target" / "g1"
    (group_dir / "journal").mkdir(parents=True)
    (group_dir / "notes.txt").write_text("the administrator's")
    (data / volume.RECORD).write_text(json.dumps({"g1": {
        "uuid": "00000000-0000-4000-8000-000000000003", "device": "/dev/gone"}}))
    released = volume.release(str(data), str(group_dir), "g1")   # not mounted: forgotten
    assert released["released"] and volume.load(str(data)) == {}
    assert not (group_dir / "journal").exists()                  # the empty mount point goes
    assert (group_dir / "notes.txt").read_text() == "the administrator's"
