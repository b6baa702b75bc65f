"""The link's bandwidth limit: set at protect, changed while replication runs."""

from __future__ import annotations

import os
import time

import nbd
from conftest import Lab, first_difference, same_bytes

MiB = 1024 * 1024


def test_a_bandwidth_limit_holds_and_changes_at_run_time(sites: Lab) -> None:
    disk = sites.image("vda.img", 64 * MiB)
    out = sites.a.ferry("protect", "g1", "--disk", "vda=%s" % disk, "--target",
                        sites.b.address, "--bandwidth", "1M").stdout
    uri = out.split("\t")[1].strip()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    assert sites.a.status("g1")["groups"]["g1"]["settings"]["bandwidth"] == MiB
    h = nbd.NBD()
    h.connect_uri(uri)
    start = time.monotonic()
    for i in range(16):
        h.pwrite(os.urandom(MiB), i * 4 * MiB)  # incompressible: the limit is on the wire
    h.flush()
    time.sleep(4)
    shipped = sites.a.status("g1")["groups"]["g1"]["disks"]["vda"]["bytes_shipped"]
    elapsed = time.monotonic() - start
    # At 1 MiB/s, plus the bucket's quarter-second burst, plus one frame (at most 4 MiB of
    # records) that may go ahead of its tokens: far from the 16 MiB written.
    bound = elapsed * MiB + MiB // 4 + 4 * MiB + MiB
    assert shipped <= bound, "shipped %d bytes in %.1f s under 1 MiB/s" % (shipped, elapsed)
    assert shipped < 16 * MiB
    out = sites.a.ferry("set", "g1", "--bandwidth", "0").stdout
    assert out.strip() == "g1: bandwidth unlimited"
    assert sites.a.status("g1")["groups"]["g1"]["settings"]["bandwidth"] == 0
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    h.shutdown()
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_bandwidth_errors(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    proc = sites.a.ferry("set", "nosuch", "--bandwidth", "1M", check=False)
    assert proc.returncode != 0 and "no group nosuch" in proc.stderr
    proc = sites.a.ferry("set", "g1", "--bandwidth", "fast", check=False)
    assert proc.returncode == 2 and "size like" in proc.stderr
    assert sites.a.api("GET", "/v1/status")["groups"]["g1"]["settings"]["bandwidth"] == 0
