"""Fencing: once site B holds a group failed over live, site A's splitters for it refuse
writes (EROFS; EPERM on the NBD wire) as soon as A hears of it, the group on A shows
`fenced` with B's reason and what A holds that B never received, and a splitter that
restarts is fenced again."""

from __future__ import annotations

import errno

import nbd
import pytest
from conftest import Lab
from test_faults import wait_for

MiB = 1024 * 1024


def group(lab: Lab) -> dict:
    return lab.a.status("g1")["groups"]["g1"]


def test_a_failed_over_group_is_fenced_on_site_a(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"A" * 65536, 0)
    h.flush()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    # Writes A takes while its link is paused never reach B: held on A only.
    sites.a.ferry("pause", "g1")
    h.pwrite(b"a" * MiB, 2 * MiB)
    h.flush()
    sites.b.ferry("failover", "g1", "--live")
    sites.a.ferry("resume", "g1")
    wait_for(lambda: group(sites)["state"] == "fenced", what="site A to be fenced",
             timeout=60)
    # The splitter's counters come every second or so: what A alone holds shows then.
    wait_for(lambda: group(sites)["fenced"]["unreplicated_bytes"] >= MiB,
             what="A's unreplicated writes in status: %s" % group(sites)["fenced"])
    g = group(sites)
    assert "failed over live on site B" in g["fenced"]["reason"], g
    assert all(d["state"] == "fenced" for d in g["disks"].values()), g
    assert g["link"]["state"] == "down"
    # The VM's writes are refused with a clear errno (EROFS in the splitter, which the NBD
    # protocol carries as EPERM); its reads still work.
    wait_for(lambda: group(sites)["disks"]["vda"].get("error") is None, what="status")
    with pytest.raises(nbd.Error) as e:
        h.pwrite(b"x" * 4096, 0)
    assert e.value.errno in ("EPERM", errno.EPERM), e.value
    assert h.pread(4096, 0) == b"A" * 4096
    h.shutdown()
    # A splitter that restarts (nbdkit killed) is told again when it connects.
    sites.a.kill_splitters()
    wait_for(lambda: _write_refused(uri), what="the restarted splitter to be fenced",
             timeout=60)
    assert "FENCED" in sites.a.log.read_text()
    events = sites.a.ferry("events", "--json").stdout
    assert '"fenced"' in events, events[-2000:]


def _write_refused(uri: str) -> bool:
    h = nbd.NBD()
    try:
        h.connect_uri(uri)
    except nbd.Error:
        return False  # not serving again yet
    try:
        h.pwrite(b"y" * 4096, 0)
        return False
    except nbd.Error as e:
        return e.errno in ("EPERM", errno.EPERM)
    finally:
        del h


def read_all(uri: str, size: int) -> bytes:
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        return h.pread(size, 0)
    finally:
        h.shutdown()


def test_move_goes_live_on_site_b_with_nothing_lost(sites: Lab) -> None:
    import json

    disk = sites.image("vda.img", 8 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(32):  # the last of these are still in flight when the move starts
        h.pwrite(bytes([65 + i % 26]) * 65536, i * 131072)
    h.flush()
    out = json.loads(sites.a.ferry("move", "g1", "--json").stdout)
    assert out["moved"] and out["lost_writes"] == 0, out
    with pytest.raises(nbd.Error):
        h.pwrite(b"z" * 4096, 0)  # A is fenced: the VM there can change nothing now
    h.shutdown()
    b = sites.b.status("g1")["replicas"]["g1"]
    assert b["failover"]["state"] == "done", b["failover"]
    assert b["failover"]["checkpoint"]["id"] == out["checkpoint"]
    assert b["failover"]["checkpoint"]["kind"] == "move"
    live = b["views"][0]["disks"]["vda"]
    assert read_all(live, 8 * MiB) == disk.read_bytes(), "site B is not what A held"
    wait_for(lambda: group(sites)["state"] == "fenced", what="A fenced after the move")
    proc = sites.a.ferry("move", "g1", check=False)
    assert proc.returncode == 4 and "fenced already" in proc.stderr, proc.stderr


def test_a_move_that_cannot_finish_lifts_the_fence(lab: Lab) -> None:
    from lab.proxy import FaultProxy

    lab.b.start()
    lab.a.start()
    host, port = lab.b.address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        disk = lab.image("vda.img", 8 * MiB)
        out = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target",
                          proxy.address).stdout
        uri = out.split("\t")[1].strip()
        lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
        h = nbd.NBD()
        h.connect_uri(uri)
        proxy.stall()
        h.pwrite(b"q" * 65536, 0)  # owed to B, which cannot get it now
        proc = lab.a.ferry("move", "g1", "--timeout", "3", check=False)
        assert proc.returncode == 6 and "not synced" in proc.stderr, proc.stderr
        h.pwrite(b"r" * 4096, 0)  # the fence is lifted: the VM writes on
        h.flush()
        h.shutdown()
        assert "move aborted" in lab.a.log.read_text()
        proxy.heal()
        lab.a.ferry("wait", "g1", "--synced", "--timeout", "90")
        assert lab.b.status("g1")["replicas"]["g1"]["failover"] is None
    # A move refused before it starts fences nothing.
    lab.a.ferry("pause", "g1")
    proc = lab.a.ferry("move", "g1", check=False)
    assert proc.returncode == 4 and "not replicating" in proc.stderr, proc.stderr
