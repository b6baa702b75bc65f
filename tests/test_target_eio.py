"""EIO under site B: its data directory on ext4 (no journal, errors=continue) over a loop
device over nbdfuse over a RAM disk whose writes fail while a trigger file exists
(tests/plugins/faulty_disk.py): real kernel write errors under B's journal and replicas.
B acknowledges nothing it could not write, the source shows the storage error, replication
resumes once the device heals, and the oracle passes the end point."""

from __future__ import annotations

import os
import time
from typing import Iterator

import pytest
from conftest import Lab
from faulty_device import FaultyDisk, ext4_on
from test_faults import wait_for

from lab.oracle import OracleWriter, check

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

MiB = 1024 * 1024


@pytest.fixture
def failing_b(lab: Lab) -> Iterator[tuple]:
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    dev = FaultyDisk(lab.work, 64 * MiB)
    try:
        with ext4_on(dev, lab.b.data):
            try:
                yield lab, dev
            finally:
                lab.close()
    finally:
        dev.close()


def test_write_errors_under_site_b(failing_b) -> None:
    lab, dev = failing_b
    lab.b.start()
    lab.a.start()
    disk = lab.image("vda.img", 4 * MiB)
    uris = lab.protect("g1", disk)
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 4 * MiB, seed=71, blocks=512, pause=0.002)
    writer.start()
    try:
        wait_for(lambda: writer.log.acked > 100, what="the writer to start")
        dev.fail("pwrite")
        seen = []

        def storage_error() -> bool:
            g = lab.a.status("g1")["groups"]["g1"]
            if g["state"] == "target-storage-error":
                seen.append(g)
            return bool(seen)

        wait_for(storage_error, timeout=60, what="the storage error on the source")
        state, error = seen[0]["state"], seen[0]["error"]
        assert "Input/output error" in error, seen[0]
        acked_while_failing = writer.log.acked
        time.sleep(1)
        dev.heal()
        wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] == "replicating",
                 timeout=120, what="replication to resume once the device healed")
    finally:
        barrier = writer.finish()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    v = check({"vda": str(lab.restore("g1", "vda"))}, writer.log, barrier)
    assert v.prefix == writer.log.acked > acked_while_failing, v
    assert lab.b.proc is not None and lab.b.proc.poll() is None, "site B's agent died"
    print("\neio: source showed %s (%s) after %d writes; healed; oracle prefix %d of %d"
          % (state, error, acked_while_failing, v.prefix, writer.log.acked))
