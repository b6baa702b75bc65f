"""Replication end to end: real agents, real nbdkit splitters, real NBD clients."""

from __future__ import annotations

import json
import os
import random
import subprocess

import nbd
import pytest
from conftest import Lab, first_difference, same_bytes

MiB = 1024 * 1024


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def test_libnbd_writes_zeroes_trims_arrive_identical(sites: Lab) -> None:
    disk = sites.image("vda.img", 64 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    h = connect(uri)
    assert h.can_fua() and h.can_flush() and h.can_zero() and h.can_trim()
    rng = random.Random(1)
    for _ in range(300):
        offset = rng.randrange(0, 64 * MiB - 65536, 512)
        length = rng.choice([512, 4096, 65536])
        h.pwrite(rng.randbytes(length), offset,
                 flags=nbd.CMD_FLAG_FUA if rng.random() < 0.1 else 0)
    h.zero(1 * MiB, 2 * MiB)
    h.zero(8 * MiB, 1 * MiB, flags=nbd.CMD_FLAG_NO_HOLE)
    h.trim(16 * MiB, 4 * MiB)
    h.flush()
    h.shutdown()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_overlapping_concurrent_writes_end_identical(sites: Lab) -> None:
    """Many in-flight writes to the same few blocks: both sites end with the same bytes."""
    disk = sites.image("vda.img", 16 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    handles = [connect(uri) for _ in range(4)]
    rng = random.Random(2)
    for _ in range(50):
        for h in handles:
            for _ in range(8):
                offset = rng.randrange(0, 64) * 4096
                buf = nbd.Buffer.from_bytearray(bytearray(rng.randbytes(rng.choice([4096, 8192]))))
                h.aio_pwrite(buf, offset)
        for h in handles:
            while h.aio_in_flight() > 0:
                h.poll(-1)
    for h in handles:
        h.flush()
        h.shutdown()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_fio_verify_through_the_splitter(sites: Lab) -> None:
    disk = sites.image("vda.img", 128 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    proc = subprocess.run(
        ["fio", "--name=verify", "--ioengine=nbd", "--uri=" + uri, "--rw=randwrite",
         "--bs=4k", "--iodepth=16", "--size=32M", "--verify=crc32c", "--do_verify=1",
         "--verify_fatal=1", "--verify_state_save=0", "--output-format=json"],
        capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["io_bytes"] >= 32 * MiB
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_existing_data_is_synced_initially(sites: Lab) -> None:
    disk = sites.image("vda.img", 32 * MiB)
    with open(disk, "r+b") as f:
        f.seek(5 * MiB)
        f.write(os.urandom(3 * MiB))
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    restored = sites.restore("g1", "vda")
    assert same_bytes(disk, restored)


def test_two_disk_group_and_status_json(sites: Lab) -> None:
    d1 = sites.image("sys.img", 16 * MiB)
    d2 = sites.image("data.img", 8 * MiB)
    uris = sites.protect("vm1", d1, d2)
    assert set(uris) == {"sys", "data"}
    for name, uri in uris.items():
        assert uri.startswith("nbd+unix:///?socket=")
        h = connect(uri)
        h.pwrite(name.encode() * 1000, 4096)
        h.flush()
        h.shutdown()
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "60")
    st = sites.a.status("vm1")
    g = st["groups"]["vm1"]
    assert g["state"] == "replicating"
    assert g["target"] == sites.b.address
    for name in ("sys", "data"):
        d = g["disks"][name]
        assert d["state"] == "replicating"
        assert d["nbd_uri"] == uris[name]
        assert d["bytes_written"] >= len(name) * 1000
        assert d["bytes_shipped"] >= d["bytes_written"]
        assert d["bytes_queued"] == 0
        assert d["last_acked_seq"] > 0
        assert d["rpo_seconds"] < 5
        assert d["resync_progress"] is None and d["resync_eta_seconds"] is None
    b = sites.b.status("vm1")["replicas"]["vm1"]
    assert b["connected"] is True
    assert b["disks"]["sys"]["consistent"] is True
    for disk, name in ((d1, "sys"), (d2, "data")):
        assert same_bytes(disk, sites.restore("vm1", name))
    human = sites.a.ferry("status").stdout
    assert "group vm1" in human and "replicating" in human


def test_unprotect_stops_the_splitter_and_keeps_the_replica(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    h = connect(uri)
    h.pwrite(b"x" * 4096, 0)
    h.shutdown()
    sites.a.ferry("wait", "g1", "--synced")
    assert sites.a.splitter_pids()
    assert sites.a.ferry("unprotect", "g1").stdout.strip() == "unprotected g1"
    assert sites.a.splitter_pids() == []
    assert sites.a.status()["groups"] == {}
    assert same_bytes(disk, sites.restore("g1", "vda"))
    # The disk can be protected again, as a new protection.
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")


# -- errors: one clear line, non-zero exit, nothing lost --------------------------------------

def error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_protect_errors(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    a = sites.a
    line = error_line(a.ferry("protect", "g1", "--disk", str(sites.work / "nope.img"),
                              "--target", sites.b.address, check=False))
    assert "does not exist" in line
    line = error_line(a.ferry("protect", "g1", "--disk", str(disk), "--target",
                              "127.0.0.1:1", check=False))
    assert "unreachable" in line
    line = error_line(a.ferry("protect", "g 1", "--disk", str(disk), "--target",
                              sites.b.address, check=False))
    assert "group name" in line
    line = error_line(a.ferry("protect", "g1", "--disk", "x=%s" % disk, "--disk",
                              "x=%s" % disk, "--target", sites.b.address, check=False))
    assert "twice" in line
    sites.protect("g1", disk)
    line = error_line(a.ferry("protect", "g1", "--disk", str(disk), "--target",
                              sites.b.address, check=False))
    assert "already exists" in line
    line = error_line(a.ferry("protect", "g2", "--disk", str(disk), "--target",
                              sites.b.address, check=False))
    assert "already protected" in line
    line = error_line(a.ferry("protect", "g3", "--disk", str(disk), "--queue", "lots",
                              "--target", sites.b.address, check=False))
    assert "size" in line
    line = error_line(a.ferry("unprotect", "nosuch", check=False))
    assert "no group nosuch" in line
    line = error_line(a.ferry("status", "nosuch", check=False))
    assert "no group nosuch" in line
    line = error_line(a.ferry("wait", "nosuch", "--synced", check=False))
    assert "no group nosuch" in line
    # None of it disturbed the protected group.
    assert a.status("g1")["groups"]["g1"]["state"] in ("replicating", "initial-sync")


def test_size_mismatch_is_refused(sites: Lab) -> None:
    """The target holds group g1 with a 8 MiB disk; a 16 MiB disk of that name is refused."""
    small = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", small)
    sites.a.ferry("wait", "g1", "--synced")
    sites.a.ferry("unprotect", "g1")
    big = sites.work / "big"
    big.mkdir()
    bigdisk = big / "vda.img"
    with open(bigdisk, "wb") as f:
        f.truncate(16 * MiB)
    line = error_line(sites.a.ferry("protect", "g1", "--disk", "vda=%s" % bigdisk, "--target",
                                    sites.b.address, check=False))
    assert "refused" in line and "bytes" in line
    assert sites.a.status()["groups"] == {}


def test_restore_errors(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced")
    b = sites.b
    existing = sites.work / "exists.img"
    existing.write_bytes(b"keep me")
    line = error_line(b.ferry("restore", "g1", "--disk", "vda", "--to", str(existing),
                              check=False))
    assert "already exists" in line
    assert existing.read_bytes() == b"keep me"
    line = error_line(b.ferry("restore", "g1", "--disk", "vdz", "--to",
                              str(sites.work / "x.img"), check=False))
    assert "no disk vdz" in line
    line = error_line(b.ferry("restore", "nosuch", "--disk", "vda", "--to",
                              str(sites.work / "x.img"), check=False))
    assert "not replicated" in line
    line = error_line(b.ferry("restore", "g1", "--disk", "vda", "--to",
                              str(sites.work / "nodir" / "x.img"), check=False))
    assert "does not exist" in line


def test_cli_without_agent_says_so(lab: Lab) -> None:
    line = error_line(lab.a.ferry("status", check=False))
    assert "cannot reach the agent" in line


@pytest.mark.parametrize("bad", ["nonsense", "a:b:c:99999"])
def test_agent_refuses_bad_listen_address(lab: Lab, bad: str) -> None:
    proc = lab.a.ferry("agent", "--data", str(lab.root / "x"), "--listen", bad, check=False)
    assert proc.returncode != 0


def _source_image(path, size: int, seed: int) -> None:
    """A raw image with data, holes and zeroes, to copy into a protected disk."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for _ in range(40):
            f.seek(rng.randrange(0, size - MiB, 4096))
            f.write(rng.randbytes(rng.choice([4096, 65536, MiB])))
        f.seek(size // 2)
        f.write(bytes(MiB))


def test_nbdcopy_into_the_splitter(sites: Lab) -> None:
    """nbdcopy: several connections at once (multi-conn), zeroes, sparse copying."""
    disk = sites.image("vda.img", 64 * MiB)
    with open(disk, "r+b") as f:
        f.write(b"old" * 100000)  # must be overwritten or zeroed by the copy
    uri = sites.protect("g1", disk)["vda"]
    src = sites.work / "src.img"
    _source_image(src, 64 * MiB, 7)
    proc = subprocess.run(["nbdcopy", "--connections=4", "--requests=16", str(src), uri],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert same_bytes(src, disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    restored = sites.restore("g1", "vda")
    assert same_bytes(src, restored), first_difference(src, restored)


def test_qemu_img_convert_into_the_splitter(sites: Lab) -> None:
    disk = sites.image("vda.img", 64 * MiB)
    uri = sites.protect("g1", disk)["vda"]
    src = sites.work / "src.img"
    _source_image(src, 64 * MiB, 8)
    proc = subprocess.run(["qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", "-W",
                           str(src), uri], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert same_bytes(src, disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    restored = sites.restore("g1", "vda")
    assert same_bytes(src, restored), first_difference(src, restored)
