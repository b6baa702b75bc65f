"""A disk is its identity, not its name (issue 18), with real agents.

Hard links, symlinks and bind-mounted paths to one disk are one disk, in one group and
across groups; of 10 concurrent protects of one disk exactly one wins; the agent's own files,
/etc/passwd, a FIFO, a directory and a character device are refused; a path outside the
image roots is refused (naming the roots) until the administrator adds the root; a seed on
site B outside its roots tells nothing about the file.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import List

import pytest
from conftest import Lab

from agent.errors import Conflict, FerryError, Invalid

MiB = 1 << 20


def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def protect(lab: Lab, group: str, *disks: str, extra: tuple = ()
            ) -> subprocess.CompletedProcess:
    return lab.a.ferry("protect", group, *[a for d in disks for a in ("--disk", d)],
                       "--target", lab.b.address, *extra, check=False)


def groups(lab: Lab) -> List[str]:
    return sorted(lab.a.status()["groups"])


def test_links_and_bind_mounts_are_one_disk(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    hard = sites.work / "hard.img"
    os.link(disk, hard)
    soft = sites.work / "soft.img"
    soft.symlink_to(disk)
    bind = sites.work / "bind"
    bind.mkdir()
    subprocess.run(["mount", "--bind", str(sites.work), str(bind)], check=True)
    try:
        # In one request: the second name is the same disk.
        for other in (hard, soft, bind / "vda.img"):
            line = error_line(protect(sites, "g1", "vda=%s" % disk, "vdb=%s" % other))
            assert "disk vdb" in line and "same disk as disk vda" in line, line
        assert groups(sites) == []
        protect(sites, "g1", "vda=%s" % disk).check_returncode()
        # Across groups: each name is refused naming the group that holds the disk.
        for other in (disk, hard, soft, bind / "vda.img"):
            proc = protect(sites, "g2", "vdx=%s" % other)
            line = error_line(proc)
            assert proc.returncode == 4, proc  # Conflict
            assert "already protected (group g1, disk vda)" in line, line
        assert groups(sites) == ["g1"]
        # Once g1 lets it go, another group may take it, by any of its names.
        sites.a.ferry("unprotect", "g1")
        protect(sites, "g2", "vdx=%s" % hard).check_returncode()
        assert groups(sites) == ["g2"]
    finally:
        subprocess.run(["umount", "-l", str(bind)], check=False)


def test_ten_concurrent_protects_of_one_disk_one_wins(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    names = [sites.work / ("n%d.img" % i) for i in range(10)]
    for n in names:
        n.symlink_to(disk)
    results: List[object] = [None] * 10
    start = threading.Barrier(10)

    def one(i: int) -> None:
        body = {"name": "g%d" % i, "target": sites.b.address,
                "disks": [{"name": "vda", "path": str(names[i])}]}
        start.wait()
        try:
            results[i] = sites.a.api("POST", "/v1/groups", body, timeout=120)
        except FerryError as e:
            results[i] = e
    threads = [threading.Thread(target=one, args=(i,)) for i in range(10)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    won = [r for r in results if isinstance(r, dict)]
    lost = [r for r in results if isinstance(r, Conflict)]
    assert len(won) == 1 and len(lost) == 9, results
    winner = won[0]["group"] if "group" in won[0] else groups(sites)[0]
    for e in lost:
        text = str(e)
        assert "\n" not in text and "already protected (group %s, disk vda)" % winner in text, text
    assert groups(sites) == [winner]


def test_what_is_not_a_disk_is_refused(sites: Lab) -> None:
    a = sites.a
    fifo = sites.work / "fifo"
    os.mkfifo(fifo)
    folder = sites.work / "folder"
    folder.mkdir()
    db_link = sites.work / "db.img"
    os.link(a.data / "ferry.db", db_link)  # a hard link into the data directory
    protect(sites, "g0", "vda=%s" % sites.image("vda.img", 1 * MiB)).check_returncode()
    pidfile = next((a.data / "run").glob("*.pid"))
    replica_b = sites.b.data / "target" / "g0" / "replicas" / "vda.img"
    cases = [
        (a.data / "ferry.db", "data directory"),
        (pidfile, "data directory"),
        (a.data / "disks", "data directory"),
        (db_link, "hard link to a file in the agent's data directory"),
        (Path("/etc/passwd"), "outside the image roots"),
        (replica_b, "outside the image roots"),
        (fifo, "neither a file nor a block device"),
        (folder, "neither a file nor a block device"),
        (Path("/dev/null"), "neither a file nor a block device"),
    ]
    for path, why in cases:
        line = error_line(protect(sites, "g1", "vdb=%s" % path))
        assert why in line and str(path) in line, (path, line)
    assert groups(sites) == ["g0"]
    with open("/etc/passwd", "rb") as f:
        assert f.read(5) == b"root:"


def test_a_root_the_administrator_adds(sites: Lab) -> None:
    outside = Path(tempfile.mkdtemp(prefix="fy-roots-", dir="/tmp"))
    try:
        disk = outside / "vda.img"
        with open(disk, "wb") as f:
            f.truncate(8 * MiB)
        line = error_line(protect(sites, "g1", "vda=%s" % disk))
        assert "outside the image roots" in line and str(sites.work) in line, line
        assert "/var/lib/libvirt/images" in line and "--image-root" in line, line
        assert groups(sites) == []
        sites.a.stop()
        sites.a.image_roots.append(outside)
        sites.a.start()
        protect(sites, "g1", "vda=%s" % disk).check_returncode()
        assert groups(sites) == ["g1"]
        # A restarted agent knows its disks by identity again.
        sites.a.stop()
        sites.a.start()
        os.link(disk, outside / "again.img")
        line = error_line(protect(sites, "g2", "vdb=%s" % (outside / "again.img")))
        assert "already protected (group g1, disk vda)" in line, line
        sites.a.ferry("unprotect", "g1")
    finally:
        shutil.rmtree(outside, ignore_errors=True)


def test_a_seed_outside_the_roots_tells_nothing(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    lines = []
    for seed in ("/etc/passwd", "/etc/no-such-file"):
        line = error_line(protect(sites, "g1", "vda=%s" % disk,
                                  extra=("--preseeded", "vda=%s" % seed)))
        lines.append(line.replace(seed, "SEED"))
        assert "outside the image roots" in line, line
        assert "bytes" not in line and "exist" not in line, line
    assert lines[0] == lines[1]
    # A symlink inside the roots that leads out of them tells no more.
    link = sites.work / "seed.img"
    link.symlink_to("/etc/passwd")
    line = error_line(protect(sites, "g1", "vda=%s" % disk,
                              extra=("--preseeded", "vda=%s" % link)))
    assert "outside the image roots" in line and "bytes" not in line, line
    assert groups(sites) == []
    assert not (sites.b.data / "target" / "g1").exists()


def test_policy_refuses_a_relative_name_and_a_missing_file(tmp_path: Path) -> None:
    from agent.disks import Policy
    p = Policy(str(tmp_path / "data"), [str(tmp_path)])
    with pytest.raises(Invalid, match="give an absolute path"):
        p.open_disk("vda", "vda.img")
    with pytest.raises(FerryError, match="does not exist"):
        p.open_disk("vda", str(tmp_path / "nope.img"))


def test_config_check_of_image_roots(tmp_path: Path) -> None:
    from lab.sites import FERRY, REPO
    conf = tmp_path / "etc"
    conf.mkdir()
    (tmp_path / "images").mkdir()
    (conf / "agent.conf").write_text(
        "FERRY_DATA=%s\nFERRY_IMAGE_ROOTS=%s:relative:%s:%s\n"
        % (tmp_path / "data", tmp_path / "images", tmp_path / "data" / "img",
           tmp_path / "later"))
    proc = subprocess.run([*FERRY, "config", "check", "--conf-dir", str(conf), "--hooks",
                           str(tmp_path / "hooks"), "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    found = {f["text"]: f["level"] for f in json.loads(proc.stdout)["findings"]}
    assert proc.returncode == 1, proc
    assert found["FERRY_IMAGE_ROOTS: relative: give an absolute path"] == "error"
    assert any(t.startswith("FERRY_IMAGE_ROOTS: %s lies in FERRY_DATA"
                              % (tmp_path / "data" / "img"))
               and lvl == "error" for t, lvl in found.items()), found
    assert found["FERRY_IMAGE_ROOTS: %s is not a directory (yet)" % (tmp_path / "later")] \
        == "warning"
    assert not any(str(tmp_path / "images") in t for t in found), found


def test_a_block_device_is_its_device_number(sites: Lab) -> None:
    backing = sites.work / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(8 * MiB)
    proc = subprocess.run(["losetup", "--find", "--show", str(backing)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("no loop device here: %s" % proc.stderr.strip())
    dev = Path(proc.stdout.strip())
    try:
        rdev = os.stat(dev).st_rdev
        by_id = sites.work / "by-id-loop"  # what a /dev/disk/by-* link is
        by_id.symlink_to(dev)
        node = sites.work / "node"  # another device node of the same device
        os.mknod(node, 0o600 | 0o060000, rdev)
        protect(sites, "g1", "vda=%s" % by_id).check_returncode()
        for other in (dev, node):
            line = error_line(protect(sites, "g2", "vdb=%s" % other))
            assert "already protected (group g1, disk vda)" in line, line
        sites.a.ferry("unprotect", "g1")
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


# -- one holder per identity for restore and failover too -------------------------------------


def test_an_operation_holds_a_disk_against_protect_and_other_operations(tmp_path: Path
                                                                         ) -> None:
    from agent.disks import Policy, identity
    p = Policy(str(tmp_path / "data"), [str(tmp_path)])
    disk = tmp_path / "vda.img"
    disk.write_bytes(b"\0" * 4096)
    ident = identity(os.stat(disk))
    with p.occupy([ident], "failback of group g1"):
        with pytest.raises(Conflict, match="being written by failback of group g1"):
            p.claim(ident, "g2", "vda", str(disk))
        with pytest.raises(Conflict, match="failback of group g1 holds that disk"):
            with p.occupy([ident], "restore of group g3 disk vda"):
                pass
    p.claim(ident, "g2", "vda", str(disk))  # given back when the operation ended
    with pytest.raises(Conflict, match="disk vda of protected group g2"):
        with p.occupy([ident], "failback of group g1", group="g1"):
            pass
    with p.occupy([ident], "failback of group g2", group="g2"):  # the group's own disks
        assert p.held == {ident: "failback of group g2"}
    assert p.held == {}


def test_a_name_not_made_yet_is_held_by_its_directory_and_name(tmp_path: Path) -> None:
    from agent.disks import Policy
    p = Policy(str(tmp_path / "data"))
    (tmp_path / "out").mkdir()
    (tmp_path / "alias").symlink_to(tmp_path / "out")
    with p.occupy([p.name_key(str(tmp_path / "out" / "vm.img"))], "restore of group g1"):
        with pytest.raises(Conflict, match="restore of group g1 holds that disk"):
            with p.occupy([p.name_key(str(tmp_path / "alias" / "vm.img"))], "restore 2"):
                pass
        with p.occupy([p.name_key(str(tmp_path / "out" / "other.img"))], "restore 3"):
            pass
    with pytest.raises(FileNotFoundError):
        p.name_key(str(tmp_path / "missing" / "vm.img"))


def test_a_restore_to_a_destination_another_restore_holds_is_refused(tmp_path: Path) -> None:
    from agent.disks import Policy
    from agent.target.group import TargetGroup
    from agent.target.journal import JRecord
    from agent.target.server import _restore
    from formats.records import FLAG_INCONSISTENT, FLAG_RESYNC, KIND_CONSISTENT, KIND_WRITE

    p = Policy(str(tmp_path / "data"))
    g = TargetGroup(str(tmp_path / "data" / "g"), "g", [("a", 64)], protection="p1",
                    history_s=3600, journal_max=10**9, segment_max=1 << 20)
    g.accept([JRecord(0, 1, 1, KIND_WRITE, FLAG_RESYNC | FLAG_INCONSISTENT, 0, 64, 10,
                      b"R" * 64), JRecord(0, 1, 2, KIND_CONSISTENT, 0, 0, 0, 20, None)])
    dest = tmp_path / "vm.img"
    first = "restore of group g disk a to %s" % dest
    with p.occupy([p.name_key(str(dest))], first):
        with pytest.raises(Conflict, match="refused, %s holds" % first):
            _restore(g, "a", str(dest), None, None, p)
        assert not dest.exists()
    out = _restore(g, "a", str(dest), None, None, p)
    assert out["to"] == str(dest) and dest.read_bytes() == b"R" * 64 and p.held == {}
    with pytest.raises(Conflict, match="already exists"):
        _restore(g, "a", str(dest), None, None, p)
    g.close()


def test_a_failover_whose_live_copies_are_held_is_refused(tmp_path: Path) -> None:
    import trio

    from agent.target.group import TargetGroup
    from agent.target.server import TargetSite

    site = TargetSite(str(tmp_path / "data"), "b")
    g = TargetGroup(os.path.join(site.root, "g"), "g", [("a", 64)], protection="p1",
                    history_s=3600, journal_max=10**9, segment_max=1 << 20)
    site.groups["g"] = g
    live = site.policy.name_key(os.path.join(g.directory, "live"))
    with site.policy.occupy([live], "failover of group g (the first)", group="g"):
        with pytest.raises(Conflict, match=r"failover of group g: refused, failover of "
                                           r"group g \(the first\) holds"):
            trio.run(site.failover_live, "g", None, None)
    assert g.failover is None and site.policy.held == {}
    g.close()
