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
