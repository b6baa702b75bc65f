"""meta.json damaged (bytes flipped, cut short) or removed on site B: the group is refused
naming the file (status, restore, the source's state), `ferry repair G --rebuild-meta`
makes it again from the journal and the replicas, and the group converges with its
source, the newest state restoring as the source's disk holds it."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
from conftest import Lab, first_difference, same_bytes
from test_faults import wait_for
from test_integrity import SIZE, protected, synced, write

from agent.errors import EXIT_NOT_FOUND, StorageError
from agent.target import meta
from formats.records import KIND_APPLIED, KIND_CONSISTENT, KIND_WRITE


def damage_meta(path: Path, how: str) -> None:
    if how == "flipped":
        raw = bytearray(path.read_bytes())
        raw[0] ^= 0x5A
        raw[len(raw) // 2] ^= 0x5A
        path.write_bytes(bytes(raw))
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    else:
        path.unlink()


def test_a_damaged_or_missing_meta_json_is_named_and_rebuilt(sites: Lab) -> None:
    disk, uri = protected(sites, "g1")
    rng = random.Random(21)
    path = sites.b.data / "target" / "g1" / "meta.json"
    proc = sites.b.ferry("repair", "g1", "--rebuild-meta", check=False)
    assert proc.returncode != 0 and "nothing to rebuild" in proc.stderr, proc.stderr
    for how in ("flipped", "truncated", "removed"):
        sites.a.ferry("checkpoint", "g1", "--tag", "older-%s" % how)
        write(uri, rng, big=True)
        sites.a.ferry("checkpoint", "g1", "--tag", "before-%s" % how)
        synced(sites, "g1")
        before = sites.work / ("before-%s.img" % how)
        shutil.copyfile(disk, before)
        assert any(c.get("tag") == "older-%s" % how for c in json.loads(
            sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"])
        sites.b.stop()
        damage_meta(path, how)
        sites.b.start()
        st = sites.b.status()["replicas"]["g1"]
        assert str(path) in st["error"] and "--rebuild-meta" in st["error"], st
        proc = sites.b.ferry("restore", "g1", "--disk", "g1-vda", "--to",
                             str(sites.work / ("r-%s.img" % how)), check=False)
        err = proc.stderr.strip()
        assert proc.returncode != 0 and len(err.splitlines()) == 1 and str(path) in err, err
        wait_for(lambda: sites.a.status("g1")["groups"]["g1"]["state"]
                 == "target-storage-error", what="the source to show B's storage error")
        write(uri, rng)  # the writer goes on meanwhile
        out = json.loads(sites.b.ferry("repair", "g1", "--rebuild-meta", "--json").stdout)
        assert out["file"] == str(path) and out["disks"] == ["g1-vda"], out
        saved = json.loads(path.read_text())
        assert saved["group"] == "g1" and saved["disks"][0]["size"] == SIZE
        # The source's next session gives the protection; the group converges.
        synced(sites, "g1")
        assert json.loads(path.read_text()).get("rebuilt") is None
        restored = sites.restore("g1", "g1-vda")
        assert same_bytes(disk, restored), first_difference(disk, restored)
        assert sites.b.status()["replicas"]["g1"]["state"] == "receiving"
        # The history before the rebuild is gone but for the state the replicas are at
        # now (the newest checkpoint, when nothing came after it); a checkpoint after the
        # rebuild restores.
        listed = json.loads(sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"]
        assert all(c.get("tag") != "older-%s" % how for c in listed), listed
        if any(c.get("tag") == "before-%s" % how for c in listed):
            dest = sites.work / ("r-before-%s.img" % how)
            sites.b.ferry("restore", "g1", "--disk", "g1-vda", "--to", str(dest),
                          "--checkpoint", "before-%s" % how)
            assert same_bytes(before, dest), first_difference(before, dest)
        cid = sites.a.ferry("checkpoint", "g1", "--tag", "after-%s" % how).stdout.strip()
        copy = sites.work / ("after-%s.img" % how)
        shutil.copyfile(disk, copy)
        synced(sites, "g1")
        dest = sites.work / ("r-after-%s.img" % how)
        sites.b.ferry("restore", "g1", "--disk", "g1-vda", "--to", str(dest),
                      "--checkpoint", cid)
        assert same_bytes(copy, dest), first_difference(copy, dest)
    assert "rebuilt from the journal and the replicas" in sites.b.log.read_text()
    proc = sites.b.ferry("repair", "nosuch", "--rebuild-meta", check=False)
    assert proc.returncode == EXIT_NOT_FOUND, proc.stderr
    for bad in (("--rebuild-meta", "--disk", "g1-vda"), ()):
        proc = sites.b.ferry("repair", "g1", *bad, check=False)
        assert proc.returncode == 2, proc.stderr


def test_rebuild_reads_the_replicas_and_the_journal(tmp_path: Path) -> None:
    replicas = tmp_path / "replicas"
    with pytest.raises(StorageError, match="replicas"):
        meta.rebuild(str(tmp_path), "g")
    replicas.mkdir()
    with pytest.raises(StorageError, match="holds no replica"):
        meta.rebuild(str(tmp_path), "g")
    (replicas / "b.img").write_bytes(b"x" * 100)
    (replicas / "a.img").write_bytes(b"y" * 50)
    (replicas / "a.digests").write_bytes(b"")
    m = meta.rebuild(str(tmp_path), "g", None, [(0, KIND_APPLIED), (1, KIND_APPLIED),
                                               (1, KIND_CONSISTENT), (1, KIND_WRITE)])
    assert [(d["name"], d["size"], d["ever_consistent"]) for d in m["disks"]] == \
        [("a", 50, False), ("b", 100, True)]
    assert meta.load(str(tmp_path)) == m and m["rebuilt"] and m["protection"] is None
    m = meta.rebuild(str(tmp_path), "g", ["b", "a"])
    assert [d["name"] for d in m["disks"]] == ["b", "a"]
    with pytest.raises(StorageError, match="are not the replicas"):
        meta.rebuild(str(tmp_path), "g", ["a", "c"])
    with pytest.raises(StorageError, match="records of disk 2"):
        meta.rebuild(str(tmp_path), "g", None, [(2, KIND_WRITE)])
