"""Online verify (``ferry verify``): a byte flipped in site B's replica is found while the
group replicates and repaired by a resync of the range it names; a group written all along
verifies clean, and the oracle passes its restored point."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import Lab, first_difference, same_bytes
from test_faults import wait_for
from test_repair import flip_replica_byte, written_disk

from agent.errors import EXIT_CONFLICT, EXIT_NOT_FOUND, EXIT_UNAVAILABLE
from agent.protocol import messages
from agent.protocol.frames import ProtocolError
from agent.source.verify import ranges_of, runs
from lab.oracle import OracleWriter, check

MiB = 1024 * 1024


def verify(lab: Lab, *args: str) -> tuple:
    proc = lab.a.ferry("verify", "g1", "--json", "--settle", "0.5", *args, check=False)
    assert proc.returncode in (0, 1), proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def test_a_flipped_replica_byte_is_found_and_resynced(sites: Lab) -> None:
    disk, _uri = written_disk(sites)
    rc, out = verify(sites)
    assert rc == 0 and out["disks"]["vda"]["differing"] == [], out
    flip_replica_byte(sites, 3 * MiB + 12345)
    rc, out = verify(sites)
    d = out["disks"]["vda"]
    assert rc == 1 and d["differing"] == [[3 * MiB, MiB]] and d["same"] == 7, out
    text = sites.a.ferry("verify", "g1", "--settle", "0", check=False).stdout
    assert "differs: --range %d:%d" % (3 * MiB, MiB) in text, text
    sites.a.ferry("resync", "g1", "--disk", "vda", "--range", "%d:%d" % (3 * MiB, MiB))
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    wait_for(lambda: verify(sites)[0] == 0, timeout=60, what="verify to find it repaired")
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    # --repair does both at once.
    flip_replica_byte(sites, 6 * MiB)
    rc, out = verify(sites, "--repair", "--disk", "vda")
    assert rc == 1 and out["repair_asked"] and out["disks"]["vda"]["differing"] == [
        [6 * MiB, MiB]], out
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    wait_for(lambda: verify(sites)[0] == 0, timeout=60, what="the --repair to land")


def test_a_group_written_all_along_verifies_clean_and_passes_the_oracle(sites: Lab) -> None:
    disks = [sites.image("vda.img", 16 * MiB), sites.image("vdb.img", 8 * MiB)]
    uris = sites.protect("g1", *disks)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 8 * MiB, seed=11, blocks=512, pause=0.005)
    writer.start()
    try:
        wait_for(lambda: writer.log.acked > 50, what="the writer to start")
        before = writer.log.acked
        rc, out = verify(sites)
        assert writer.log.acked > before + 50, "the writer stalled during verify"
        assert rc == 0, out
        for name in ("vda", "vdb"):
            d = out["disks"][name]
            assert d["differing"] == [] and d["same"] + sum(
                n for _o, n in d["busy"]) // MiB == d["chunks"], out
    finally:
        barrier = writer.finish()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    images = {name: str(sites.restore("g1", name)) for name in ("vda", "vdb")}
    v = check(images, writer.log, barrier)
    assert v.prefix == writer.log.acked, v
    assert verify(sites)[0] == 0


def test_verify_refusals(sites: Lab) -> None:
    big = sites.image("big.img", 32 * MiB)
    with open(big, "r+b") as f:
        f.write(os.urandom(32 * MiB))
    sites.a.ferry("protect", "g2", "--disk", "big=%s" % big, "--target", sites.b.address,
                  "--bandwidth", "1M")
    proc = sites.a.ferry("verify", "g2", check=False)
    assert proc.returncode == EXIT_CONFLICT and "being synced" in proc.stderr, proc.stderr
    sites.a.ferry("unprotect", "g2")
    written_disk(sites)
    proc = sites.a.ferry("verify", "nosuch", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "nosuch" in proc.stderr, proc.stderr
    proc = sites.a.ferry("verify", "g1", "--disk", "nosuch", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "nosuch" in proc.stderr, proc.stderr
    proc = sites.a.ferry("verify", "g1", "--chunk", "12K", check=False)
    assert proc.returncode == 1 and "power of two" in proc.stderr, proc.stderr
    proc = sites.b.ferry("verify", "g1", check=False)  # site B is not the source
    assert proc.returncode == EXIT_NOT_FOUND, proc.stderr
    sites.a.ferry("pause", "g1")  # no session of the shipper's makes the group anew on B
    sites.b.stop()
    proc = sites.a.ferry("verify", "g1", check=False)
    assert proc.returncode == EXIT_UNAVAILABLE and "cannot be asked" in proc.stderr, (
        proc.returncode, proc.stdout, proc.stderr)
    shutil.rmtree(sites.b.data / "target" / "g1")
    sites.b.start()
    proc = sites.a.ferry("verify", "g1", check=False)
    assert proc.returncode == EXIT_CONFLICT and "holds no replica" in proc.stderr, (
        proc.returncode, proc.stdout, proc.stderr)


def test_runs_and_ranges() -> None:
    assert runs([5, 1, 2, 3, 9]) == [(1, 3), (5, 1), (9, 1)]
    assert runs([0, 1, 2], most=2) == [(0, 2), (2, 1)]
    assert ranges_of([0, 1, 3], MiB, 3 * MiB + 5) == [(0, 2 * MiB), (3 * MiB, 5)]


OPEN = {"group": "g1", "protection": "p", "probe": True,
        "disks": [{"name": "vda", "size": 8 * MiB}]}


def test_open_verify_is_checked() -> None:
    ctx = messages.Context()
    ok = messages.Open.parse(dict(OPEN, verify={"disk": 0, "chunk": MiB, "first": 2,
                                                 "count": 6}), ctx)
    assert ok.verify == (0, MiB, 2, 6)
    assert messages.Open.parse(ok.body(), ctx) == ok
    for bad, why in [
        ({"disk": 1, "chunk": MiB, "first": 0, "count": 1}, "out of range"),
        ({"disk": 0, "chunk": 3 * 4096, "first": 0, "count": 1}, "power of two"),
        ({"disk": 0, "chunk": MiB, "first": 2, "count": 7}, "past the end"),
        ({"disk": 0, "chunk": MiB, "first": 0, "count": 0}, "out of range"),
        ({"disk": 0, "chunk": 1024, "first": 0, "count": 1}, "out of range"),
        ("all", "wrong type"),
    ]:
        with pytest.raises(ProtocolError, match=why):
            messages.Open.parse(dict(OPEN, verify=bad), ctx)
    with pytest.raises(ProtocolError, match="in a probe only"):
        messages.Open.parse(dict(OPEN, probe=False, verify={"disk": 0, "chunk": MiB,
                                                              "first": 0, "count": 1}), ctx)


def test_opened_verify_is_checked() -> None:
    ctx = messages.Context("g1", 1)
    ok = messages.Opened("g1", ((1, 5),), 0, b"x" * 16, (1, 4))
    assert messages.Opened.parse(ok.body(), ctx) == ok
    for bad in ({"digests": b"x" * 15, "at": [1, 4]}, {"digests": "x" * 16, "at": [1, 4]},
                {"digests": b"x" * 16, "at": [1]}, {"digests": b"x" * 16},
                {"digests": b"x" * 8 * (messages.MAX_VERIFY_CHUNKS + 1), "at": [1, 4]}):
        with pytest.raises(ProtocolError):
            messages.Opened.parse({"group": "g1", "durable": [[1, 5]], "verify": bad}, ctx)


def test_a_damaged_journal_record_on_site_b_is_a_refusal_naming_it(sites: Lab) -> None:
    """Site B reads its newest point through the journal reader, which checks every record:
    a record that fails its checksum is not hashed, B refuses, and verify says so."""
    import random

    from test_integrity import flip_big_write, protected, segments, write

    _disk, uri = protected(sites, "g1")
    write(uri, random.Random(3), big=True)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    seg = segments(sites, "g1")[-1]
    flip_big_write(seg)
    proc = sites.a.ferry("verify", "g1", check=False)
    err = proc.stderr.strip()
    assert proc.returncode == EXIT_CONFLICT and len(err.splitlines()) == 1, proc
    assert "site B refused" in err and "damaged bytes" in err and str(seg) in err, err
    assert "verify for" in sites.b.log.read_text()
    assert "Traceback" not in sites.b.log.read_text()
