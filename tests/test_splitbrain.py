"""Split brain made on purpose: site A's link is cut by the lab proxy, site B fails over
live and its VM writes, A's VM writes too, the link heals. Both sites report it (status and
an event), nothing is resolved by itself, and ``ferry resolve --keep a`` keeps B's live disk
aside and gives the group back to A's writes. And resolve's refusals."""

from __future__ import annotations

import json

import nbd
from conftest import Lab, first_difference, same_bytes
from test_failback import a_group, b_replica, refused, write
from test_faults import wait_for

MiB = 1024 * 1024


def events(site, kind: str) -> list:
    lines = site.ferry("events", "--json").stdout.splitlines()
    return [e for e in map(json.loads, lines) if e["kind"] == kind]


def test_split_brain_is_reported_kept_and_resolved_for_a(lab: Lab) -> None:
    from lab.proxy import FaultProxy

    lab.b.start()
    lab.a.start()
    host, port = lab.b.address.rsplit(":", 1)
    with FaultProxy((host, int(port))) as proxy:
        disk = lab.image("vda.img", 16 * MiB)
        out = lab.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target",
                          proxy.address).stdout
        uri = out.split("\t")[1].strip()
        write(uri, [1], 1)
        lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
        assert "no split brain" in refused(lab.b, "resolve", "g1", "--keep", "a")
        proxy.cut()
        wait_for(lambda: a_group(lab)["link"]["state"] != "connected", what="link down",
                 timeout=60)
        live_uri = json.loads(lab.b.ferry("failover", "g1", "--live", "--json").stdout
                              )["disks"]["vda"]
        write(live_uri, [2], 2)   # B's VM
        write(uri, [3], 3)        # A's VM: not fenced, it cannot know
        assert "no split brain" in refused(lab.b, "resolve", "g1", "--keep", "b")
        proxy.heal()
        wait_for(lambda: (b_replica(lab)["failover"] or {}).get("split_brain"),
                 what="split brain on site B", timeout=90)
        wait_for(lambda: (a_group(lab)["fenced"] or {}).get("split_brain"),
                 what="split brain on site A", timeout=60)
        sb = b_replica(lab)["failover"]["split_brain"]
        assert sb["a_unreplicated_bytes"] >= 256 * 1024 and sb["b_live_written"], sb
        assert sb["resolved"] is None
        wait_for(lambda: events(lab.b, "split-brain") and events(lab.a, "split-brain"),
                 what="split-brain events on both sites", timeout=30)
        # Never resolved by itself: a failback waits, and the failover still holds.
        assert "split brain" in refused(lab.b, "failback", "g1", "--target",
                                        lab.a.address)
        assert "--keep" in refused(lab.b, "resolve", "g1")
        assert "keep" in refused(lab.b, "resolve", "g1", "--keep", "b", "--drop-kept")
        b_live = lab.b.data / "target" / "g1" / "live" / "vda.img"
        b_bytes = b_live.read_bytes()
        out = json.loads(lab.b.ferry("resolve", "g1", "--keep", "a", "--json").stdout)
        kept = lab.b.data / "kept" / "g1" / "vda.img"
        assert out["kept"] == {"vda": str(kept)} and kept.read_bytes() == b_bytes, out
        assert b_replica(lab)["failover"] is None
        assert "no split brain" in refused(lab.b, "resolve", "g1", "--keep", "a")
        # A asks again (an agent restart asks at once): its fence lifts, its writes ship.
        lab.a.stop()
        lab.a.start()
        wait_for(lambda: a_group(lab)["state"] == "replicating", what="A replicating",
                 timeout=60)
        h = nbd.NBD()
        h.connect_uri(uri)
        h.pwrite(b"after" * 1000, 5 * MiB)
        h.flush()
        h.shutdown()
        lab.a.ferry("wait", "g1", "--synced", "--timeout", "90")
        restored = lab.work / "restored.img"
        lab.b.ferry("restore", "g1", "--disk", "vda", "--to", str(restored))
        assert same_bytes(disk, restored), first_difference(disk, restored)
    lab.b.ferry("resolve", "g1", "--drop-kept")
    assert not kept.exists()
    assert "no kept copies" in refused(lab.b, "resolve", "g1", "--drop-kept")
