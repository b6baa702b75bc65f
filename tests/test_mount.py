"""File-level restore: `ferry mount` puts a disk's file system as of a checkpoint read-only
under a directory on site B (view -> nbdfuse -> loop device -> mount), `ferry umount`
takes it all down again; refused directories and a disk without a file system leave
nothing behind."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from conftest import Lab
from test_faults import wait_for

from agent.errors import EXIT_CONFLICT, EXIT_FAILURE, EXIT_NOT_FOUND

MiB = 1024 * 1024


def debugfs(image: Path, *commands: str) -> None:
    for c in commands:
        subprocess.run(["debugfs", "-w", "-R", c, str(image)], check=True,
                       capture_output=True)


def loops() -> str:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout


def test_mount_a_checkpoint_and_umount(sites: Lab, tmp_path: Path) -> None:
    img = sites.image("vda.img", 32 * MiB)
    subprocess.run(["mkfs.ext4", "-q", "-F", str(img)], check=True)
    (tmp_path / "one").write_text("first file\n")
    (tmp_path / "two").write_text("second file\n")
    debugfs(img, "write %s one.txt" % (tmp_path / "one"))
    uri = sites.protect("g1", img)["vda"]
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    sites.a.ferry("checkpoint", "g1", "--tag", "first")
    # Change the file system through the splitter (nbdfuse on site A).
    fuse = tmp_path / "fuse"
    fuse.mkdir()
    proc = subprocess.Popen(["nbdfuse", str(fuse), uri])
    try:
        wait_for(lambda: (fuse / "nbd").exists(), what="nbdfuse on site A")
        debugfs(fuse / "nbd", "write %s two.txt" % (tmp_path / "two"), "rm one.txt")
    finally:
        subprocess.run(["umount", str(fuse)], check=False)
        proc.wait(30)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    sites.a.ferry("checkpoint", "g1", "--tag", "second")
    before = loops()

    where = tmp_path / "restore"
    where.mkdir()
    out = json.loads(sites.b.ferry("mount", "g1", str(where), "--disk", "vda",
                                   "--checkpoint", "first", "--json").stdout)
    assert out["file_systems"][0]["type"] == "ext4", out
    assert (where / "one.txt").read_text() == "first file\n"
    assert not (where / "two.txt").exists()
    with pytest.raises(OSError):  # read-only
        (where / "new.txt").write_text("x")
    st = sites.b.status("g1")["replicas"]["g1"]
    assert [m["directory"] for m in st["mounts"]] == [str(where)]
    assert len(st["views"]) == 1  # the view that serves it
    text = sites.b.ferry("umount", str(where)).stdout
    assert "unmounted g1/vda" in text
    assert not os.path.ismount(where) and os.listdir(where) == []
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["mounts"] == [] and st["views"] == []
    assert loops() == before

    sites.b.ferry("mount", "g1", str(where), "--disk", "vda", "--checkpoint", "second")
    assert (where / "two.txt").read_text() == "second file\n"
    assert not (where / "one.txt").exists()
    sites.b.ferry("umount", str(where))
    assert loops() == before


def test_mount_refusals_leave_nothing_behind(sites: Lab, tmp_path: Path) -> None:
    img = sites.image("vda.img", 8 * MiB)  # zeroes: no file system on it
    sites.protect("g1", img)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    wait_for(lambda: sites.b.status("g1")["replicas"]["g1"]["newest_checkpoint"],
             what="a checkpoint on site B")
    before = loops()
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    link = tmp_path / "link"
    link.symlink_to(tmp_path)
    cases = [
        (str(full), EXIT_CONFLICT, "not empty"),
        (str(link), EXIT_FAILURE, "not a directory one can mount on"),
        (str(tmp_path / "nosuch"), EXIT_NOT_FOUND, "does not exist"),
        (str(sites.b.data), EXIT_FAILURE, "data directory"),
    ]
    for directory, status, words in cases:
        proc = sites.b.ferry("mount", "g1", directory, "--disk", "vda", check=False)
        assert proc.returncode == status and words in proc.stderr, (directory, proc.stderr)
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = sites.b.ferry("mount", "g1", str(empty), "--disk", "nosuch", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "no disk nosuch" in proc.stderr
    proc = sites.b.ferry("mount", "g1", str(empty), "--disk", "vda", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "no file system found" in proc.stderr
    proc = sites.b.ferry("umount", str(empty), check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "no Ferry mount" in proc.stderr
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["mounts"] == [] and st["views"] == []
    assert loops() == before
    assert not os.path.ismount(empty)
    assert os.listdir(sites.b.data / "mounts") == []
