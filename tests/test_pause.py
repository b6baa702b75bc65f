"""Pausing a group: shipping stops (writes do not), across an agent restart, until resumed."""

from __future__ import annotations

import os
import time

import nbd
from conftest import Lab, first_difference, same_bytes

MiB = 1024 * 1024


def test_pause_and_resume(sites: Lab) -> None:
    disk = sites.image("vda.img", 32 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    sites.a.ferry("wait", "g1", "--synced")
    assert sites.a.ferry("pause", "g1").stdout.strip() == "g1 paused"
    h = nbd.NBD()
    h.connect_uri(uri)
    for i in range(8):
        h.pwrite(os.urandom(MiB), i * 2 * MiB)
    h.flush()
    time.sleep(1)
    g = sites.a.status("g1")["groups"]["g1"]
    assert g["state"] == "paused" and "ferry resume" in g["error"]
    assert g["disks"]["vda"]["state"] == "paused"
    assert g["disks"]["vda"]["bytes_queued"] >= 8 * MiB  # the writes wait in the queue
    proc = sites.a.ferry("wait", "g1", "--synced", "--timeout", "2", check=False)
    assert proc.returncode != 0 and "not synced" in proc.stderr
    # Paused stays paused across an agent restart.
    sites.a.stop()
    sites.a.start()
    time.sleep(1)
    assert sites.a.status("g1")["groups"]["g1"]["state"] == "paused"
    assert sites.a.ferry("resume", "g1").stdout.strip() == "g1 resumed"
    h.pwrite(b"after" * 100, 0)
    h.flush()
    h.shutdown()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    assert sites.a.status("g1")["groups"]["g1"]["state"] == "replicating"
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_pause_of_an_unknown_group(sites: Lab) -> None:
    for verb in ("pause", "resume"):
        proc = sites.a.ferry(verb, "nosuch", check=False)
        assert proc.returncode != 0 and "no group nosuch" in proc.stderr
