"""``protect --splitter-threads N``: how many requests each disk's splitter serves at once.
The setting reaches nbdkit (its command line), is kept across a restart of the splitter,
shows in status, and bad values are refused before anything is made."""

from __future__ import annotations

import json
import os
import random
import signal
from typing import List

import nbd
import pytest
from conftest import Lab, first_difference, same_bytes
from test_faults import wait_for
from test_replication import connect, error_line

from agent.errors import Invalid

MiB = 1024 * 1024


def nbdkit_threads(pid: int) -> int:
    with open("/proc/%d/cmdline" % pid, "rb") as f:
        args: List[bytes] = f.read().split(b"\0")
    return int(args[args.index(b"--threads") + 1])


def test_one_thread_serves_overlapping_writes_and_survives_a_restart(sites: Lab) -> None:
    disk = sites.image("vda.img", 16 * MiB)
    uri = sites.protect("g1", disk, extra=("--splitter-threads", "1"))["vda"]
    [pid] = sites.a.splitter_pids()
    assert nbdkit_threads(pid) == 1
    status = json.loads(sites.a.ferry("status", "g1", "--json").stdout)
    assert status["groups"]["g1"]["disks"]["vda"]["splitter_threads"] == 1

    # 16 writes in flight on one thread, to a few overlapping blocks: all served, in order.
    h = connect(uri)
    rng = random.Random(3)
    for _ in range(40):
        for _ in range(16):
            buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(4096)))
            h.aio_pwrite(buf, rng.randrange(0, 32) * 4096)
        while h.aio_in_flight() > 0:
            h.poll(-1)
    h.flush()
    h.shutdown()

    # The splitter killed: the agent starts it again with the same setting.
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: [p for p in sites.a.splitter_pids() if p != pid
                      and os.path.exists("/proc/%d" % p)], 60, "the splitter restarted")
    [pid2] = sites.a.splitter_pids()
    assert nbdkit_threads(pid2) == 1
    h = connect(uri)
    h.pwrite(rng.randbytes(MiB), 4 * MiB)
    h.flush()
    h.shutdown()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_the_default_is_sixteen(sites: Lab) -> None:
    disk = sites.image("vda.img", 4 * MiB)
    sites.protect("g1", disk)
    [pid] = sites.a.splitter_pids()
    assert nbdkit_threads(pid) == 16
    status = json.loads(sites.a.ferry("status", "g1", "--json").stdout)
    assert status["groups"]["g1"]["disks"]["vda"]["splitter_threads"] == 16
    assert status["groups"]["g1"]["settings"]["splitter_threads"] == 16


@pytest.mark.parametrize("value", [0, 65, "4", True, -1])
def test_bad_values_are_refused_over_http(sites: Lab, value: object) -> None:
    disk = sites.image("vda.img", 4 * MiB)
    with pytest.raises(Invalid, match="splitter_threads must be an integer from 1 to 64"):
        sites.a.api("POST", "/v1/groups", {
            "name": "g1", "target": sites.b.address, "splitter_threads": value,
            "disks": [{"name": "vda", "path": str(disk)}]})
    assert sites.a.api("GET", "/v1/status")["groups"] == {}
    assert sites.a.splitter_pids() == []


def test_bad_values_are_refused_on_the_command_line(sites: Lab) -> None:
    disk = sites.image("vda.img", 4 * MiB)
    for value in ("0", "65", "many"):
        proc = sites.a.ferry("protect", "g1", "--disk", str(disk), "--target", sites.b.address,
                             "--splitter-threads", value, check=False)
        assert proc.returncode == 2, proc.stderr
        assert "--splitter-threads" in error_line(proc)
    assert sites.a.splitter_pids() == []
