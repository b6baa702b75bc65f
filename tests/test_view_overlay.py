"""``ferry view --overlay``: a qcow2 over the replica holding the journal's changes up to a
point (real agents, nbdkit, qemu-img, qemu-io, qemu-nbd)."""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from agent.errors import Conflict, StorageError
from agent.target import overlays
from tests.conftest import Lab
from tests.test_replication import error_line

MiB = 1024 * 1024


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    if check:
        assert proc.returncode == 0, "%s: %s%s" % (" ".join(cmd), proc.stdout, proc.stderr)
    return proc


def qemu_io(target: str, fmt: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", fmt]
    for c in cmds:
        args += ["-c", c]
    run(*args, target)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_view_overlay(sites: Lab) -> None:
    a, b, work = sites.a, sites.b, sites.work
    uris = sites.protect("vm", sites.image("d1.img", 16 * MiB), sites.image("d2.img", 8 * MiB))
    a.ferry("wait", "vm", "--synced", "--timeout", "120")  # later writes are journaled
    qemu_io(uris["d1"], "raw", "write -P 0x11 0 4M", "write -P 0x22 6M 1M",
            "write -z 1M 1M", "write -P 0x33 %d 4096" % (9 * MiB + 512), "flush")
    qemu_io(uris["d2"], "raw", "write -P 0x44 0 1M", "flush")
    a.ferry("checkpoint", "vm", "--tag", "t1")
    qemu_io(uris["d1"], "raw", "write -P 0x55 0 8M", "flush")   # after the point: not in it
    a.ferry("wait", "vm", "--synced", "--timeout", "120")
    expect = work / "t1-d1.raw"
    b.ferry("restore", "vm", "--disk", "d1", "--to", str(expect), "--checkpoint", "t1")
    shown = b.status("vm")["replicas"]["vm"]["disks"]["d1"]
    replica = Path(shown["replica"])
    assert (shown["replica_format"], shown["replica_allocated_bytes"]) == (
        "raw", replica.stat().st_blocks * 512)

    # Refused in one line, nothing left behind, no view left open.
    taken = work / "taken.qcow2"
    taken.write_bytes(b"")
    for args, words in ((["--overlay", str(work / "o.qcow2")], "has 2 disks (d1, d2): name"),
                        (["--overlay", "d9=%s" % (work / "o.qcow2")], "has no disk d9"),
                        (["--overlay", "d1=%s" % taken], "already exists"),
                        (["--overlay", "d1=%s" % (work / "no" / "o.qcow2")], "does not exist")):
        line = error_line(b.ferry("view", "vm", "--checkpoint", "t1", *args, check=False))
        assert words in line, line
    assert not (work / "o.qcow2").exists()
    assert b.status("vm")["replicas"]["vm"]["views"] == []

    o1, o2 = work / "o1.qcow2", work / "o2.qcow2"
    out = b.ferry("view", "vm", "--checkpoint", "t1", "--overlay", "d1=%s" % o1,
                  "--overlay", "d2=%s" % o2, "--json").stdout
    view = json.loads(out)
    assert view["overlays"] == {"d1": str(o1), "d2": str(o2)}
    info = json.loads(run("qemu-img", "info", "--output=json", str(o1)).stdout)
    assert (info["format"], info["virtual-size"]) == ("qcow2", 16 * MiB)
    assert (info["backing-filename"], info["backing-filename-format"]) == (str(replica), "raw")
    run("qemu-img", "check", str(o1))
    # The overlay reads as the disk at the point ...
    run("qemu-img", "compare", "-f", "qcow2", "-F", "raw", str(o1), str(expect))
    qemu_io(str(o2), "qcow2", "read -P 0x44 0 1M", "read -P 0 1M 7M")
    # ... holding what the journal changed: the zeroed range as zero clusters, not data.
    extents = json.loads(run("qemu-img", "map", "--output=json", str(o1)).stdout)
    zeroed = next(e for e in extents if e["start"] <= 1 * MiB < e["start"] + e["length"])
    assert (zeroed["depth"], zeroed["zero"], zeroed["data"]) == (0, True, False), extents
    # A VM's writes stay in the overlay: the replica and later restores are as before.
    before = digest(replica)
    qemu_io(str(o1), "qcow2", "write -P 0x66 2M 1M", "flush")
    assert digest(replica) == before

    # The view and its overlays outlive the agent.
    b.stop()
    b.start()
    [kept] = b.status("vm")["replicas"]["vm"]["views"]
    assert (kept["id"], kept["overlays"]) == (view["id"], view["overlays"])
    # Closing the view is refused while a qemu holds the overlay.
    sock = str(work / "o1.sock")
    server = subprocess.Popen(["qemu-nbd", "-f", "qcow2", "--socket=" + sock, str(o1)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not Path(sock).exists():
            assert time.monotonic() < deadline and server.poll() is None
            time.sleep(0.05)
        line = error_line(b.ferry("view-close", view["id"], check=False))
        assert "overlay %s (disk d1) is in use" % o1 in line, line
        assert [v["id"] for v in b.status("vm")["replicas"]["vm"]["views"]] == [view["id"]]
    finally:
        server.terminate()
        server.wait(60)
    b.ferry("view-close", view["id"])
    # Closed: the overlay no longer opens over a replica that moves on.
    info = json.loads(run("qemu-img", "info", "-U", "--output=json", str(o1)).stdout)
    assert info["backing-filename"] == "%s.closed-view-%s" % (replica, view["id"])
    proc = run("qemu-io", "-f", "qcow2", "-c", "read 0 4k", str(o1), check=False)
    assert proc.returncode != 0 and "closed-view-" in proc.stderr
    again = work / "again.raw"
    b.ferry("restore", "vm", "--disk", "d1", "--to", str(again), "--checkpoint", "t1")
    run("cmp", str(again), str(expect))


def _spec(replica: Path, size: int) -> dict:
    """A view's spec of a disk with no journal: its replica only."""
    return {"group": "g", "name": "d", "replica": str(replica), "size": size, "disk": 0,
            "base": [0, 0], "upto": [0, 0], "start": [0, 0], "segments": []}


def test_overlay_failures_leave_nothing(tmp_path: Path) -> None:
    replica = tmp_path / "r.img"
    replica.write_bytes(b"\x77" * MiB)
    sock = str(tmp_path / "o.sock")
    made = overlays.write(str(tmp_path / "ok.qcow2"), _spec(replica, MiB), "raw", sock, "w")
    assert made["bytes"] == 0 and made["path"] == str(tmp_path / "ok.qcow2")
    qemu_io(made["path"], "qcow2", "read -P 0x77 0 1M")
    with pytest.raises(Conflict, match="already exists"):
        overlays.write(made["path"], _spec(replica, MiB), "raw", sock, "w")
    dest = tmp_path / "new.qcow2"
    with pytest.raises(StorageError, match=r"^overlay x failed: qemu-img: .*bogus"):
        overlays.write(str(dest), _spec(replica, MiB), "bogus", sock, "overlay x")
    long_sock = str(tmp_path / "nodir" / "s")   # qemu-nbd cannot bind it: it exits
    with pytest.raises(StorageError, match=r"^overlay x failed: qemu-nbd: "):
        overlays.write(str(dest), _spec(replica, MiB), "raw", long_sock, "overlay x")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ok.qcow2", "r.img"]


def test_overlay_detach(tmp_path: Path) -> None:
    replica = tmp_path / "r.img"
    replica.write_bytes(bytes(MiB))
    one = overlays.write(str(tmp_path / "one.qcow2"), _spec(replica, MiB), "raw",
                         str(tmp_path / "s"), "w")
    two = overlays.write(str(tmp_path / "two.qcow2"), _spec(replica, MiB), "raw",
                         str(tmp_path / "s"), "w")
    both = {"a": one, "b": two}
    with open(one["path"], "rb+") as f:   # a lock on it, as qemu takes: in use
        fcntl.lockf(f, fcntl.LOCK_SH | fcntl.LOCK_NB, 1, 100)
        assert overlays.in_use(one["path"], one["dev"], one["ino"])
        with pytest.raises(Conflict, match="overlay %s \\(disk a\\) is in use" % one["path"]):
            overlays.detach(both, {"a": str(replica), "b": str(replica)}, "v1", "view v1")
    assert not overlays.in_use(one["path"], one["dev"], one["ino"])
    os.rename(two["path"], two["path"] + ".old")   # replaced by another file: left alone
    Path(two["path"]).write_bytes(b"not ours")
    done = overlays.detach(both, {"a": str(replica), "b": str(replica)}, "v1", "view v1")
    assert done == [one["path"]]
    assert Path(two["path"]).read_bytes() == b"not ours"
    info = json.loads(run("qemu-img", "info", "--output=json", one["path"]).stdout)
    assert info["backing-filename"] == "%s.closed-view-v1" % replica
