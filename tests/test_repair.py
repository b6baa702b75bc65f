"""Repair from the source: a replica byte flipped on site B is made right again by asking
site A for the range (`ferry repair` on B: the request rides on an ACK) or by A's own
`ferry resync`; the disk keeps replicating meanwhile, nobody unprotects anything."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import Lab, same_bytes
from test_faults import wait_for

from agent.errors import EXIT_FAILURE, EXIT_NOT_FOUND
from agent.protocol import messages
from agent.protocol.frames import ProtocolError

MiB = 1024 * 1024


def flip_replica_byte(lab: Lab, offset: int) -> None:
    replica = lab.b.status("g1")["replicas"]["g1"]["disks"]["vda"]["replica"]
    fd = os.open(replica, os.O_RDWR)
    try:
        byte = os.pread(fd, 1, offset)
        os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def restored_as(lab: Lab, disk: Path) -> bool:
    """Does a restore of the newest point give ``disk``'s bytes? (False while a replica
    chunk that fails its digest makes it refused.)"""
    dest = lab.work / "restored-g1-vda.img"
    if dest.exists():
        dest.unlink()
    proc = lab.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest), check=False)
    if proc.returncode != 0:
        assert "fail their digest" in proc.stderr, proc.stderr
        return False
    return same_bytes(disk, dest)


def written_disk(lab: Lab) -> tuple:
    """A disk with data before it is protected: the initial sync writes it straight into
    B's replica file, where the flip below lands."""
    disk = lab.image("vda.img", 8 * MiB)
    with open(disk, "r+b") as f:
        f.write(os.urandom(4 * MiB))
    uri = lab.protect("g1", disk)["vda"]
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    return disk, uri


@pytest.mark.parametrize("side", ["target", "source"])
def test_a_flipped_replica_byte_is_repaired_from_the_source(sites: Lab, side: str) -> None:
    disk, _uri = written_disk(sites)
    flip_replica_byte(sites, 3 * MiB + 12345)
    # The flipped chunk fails its digest: the restore is refused, naming it.
    dest = sites.work / "refused.img"
    proc = sites.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest), check=False)
    assert proc.returncode == 1 and "bytes %d+%d" % (3 * MiB, MiB) in proc.stderr \
        and "vda.img" in proc.stderr, proc.stderr
    assert not dest.exists()
    if side == "target":
        out = json.loads(sites.b.ferry("repair", "g1", "--disk", "vda", "--range",
                                       "3M:1M", "--json").stdout)
        assert out["ranges"] == [[3 * MiB, MiB]] and out["connected"], out
    else:
        out = json.loads(sites.a.ferry("resync", "g1", "--disk", "vda", "--range",
                                       "3M:1M", "--json").stdout)
        assert out["bytes"] == MiB, out

    def repaired() -> bool:
        sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
        return restored_as(sites, disk)

    wait_for(repaired, timeout=90, what="the repair to reach B")
    assert "read again and sent (repair)" in sites.a.log.read_text()


def test_repair_and_resync_refusals(sites: Lab) -> None:
    written_disk(sites)
    for site, verb in ((sites.b, "repair"), (sites.a, "resync")):
        proc = site.ferry(verb, "g1", "--disk", "vda", "--range", "7M:2M", check=False)
        assert proc.returncode == EXIT_FAILURE and "not within" in proc.stderr, proc.stderr
        proc = site.ferry(verb, "g1", "--disk", "nosuch", check=False)
        assert proc.returncode == EXIT_NOT_FOUND and "nosuch" in proc.stderr, proc.stderr
        proc = site.ferry(verb, "nosuch", "--disk", "vda", check=False)
        assert proc.returncode == EXIT_NOT_FOUND, proc.stderr
        proc = site.ferry(verb, "g1", "--disk", "vda", "--range", "12", check=False)
        assert proc.returncode == 2 and "OFFSET:LENGTH" in proc.stderr, proc.stderr


def test_ack_repair_field_is_checked() -> None:
    ctx = messages.Context("g1", 2)
    ok = messages.Ack.parse({"group": "g1", "durable": [[1, 2], [1, 3]],
                             "repair": [[1, 4096, 512]]}, ctx)
    assert ok.repair == ((1, 4096, 512),)
    assert messages.Ack.parse(ok.body(), ctx) == ok
    for bad in ([[2, 0, 512]], [[0, 0, 0]], [[0, -1, 5]], [[0, 1]], "x", [[True, 0, 5]],
                [[0, 0, 1]] * (messages.MAX_REPAIRS + 1)):
        with pytest.raises(ProtocolError):
            messages.Ack.parse({"group": "g1", "durable": [[1, 2], [1, 3]],
                                "repair": bad}, ctx)
