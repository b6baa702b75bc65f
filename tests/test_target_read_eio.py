"""EIO on *reads* under site B: its data directory on ext4 over a loop device (direct I/O)
over nbdfuse over a RAM disk whose reads fail, while a trigger file names byte ranges, with
EIO (tests/plugins/faulty_disk.py): real kernel read errors on exactly one file of site B, a
journal segment or a replica (its blocks found with ``filefrag``, its page cache dropped).

A view's read, a restore, ``ferry verify``, ``ferry scrub`` and a live failover that meet the
error refuse with one line naming the file and the byte (``formats/reads.py``), hand out
nothing they could not read, and leave site B's agent running (the periodic scrub logs the
same line and goes on); a failover refused leaves nothing live and the group replicating.
Once the device heals, the same requests succeed."""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
from pathlib import Path
from typing import Iterator, List, Tuple

import nbd
import pytest
from conftest import Lab
from faulty_device import FaultyDisk, ext4_on
from test_faults import wait_for

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

MiB = 1024 * 1024
SIZE = 4 * MiB


@pytest.fixture
def eio_b(lab: Lab) -> Iterator[Tuple[Lab, FaultyDisk]]:
    if os.geteuid() != 0:
        pytest.skip("mounting a loop device needs root")
    dev = FaultyDisk(lab.work, 96 * MiB)
    try:
        with ext4_on(dev, lab.b.data, direct_io=True):
            try:
                yield lab, dev
            finally:
                lab.close()
    finally:
        dev.close()


def extents(path: Path) -> List[Tuple[int, int]]:
    """(device byte, length) of each extent of ``path`` on its ext4 (4 KiB blocks)."""
    out = subprocess.run(["filefrag", "-v", "-b4096", str(path)], check=True,
                         capture_output=True, text=True).stdout
    found = [(int(m.group(1)) * 4096, (int(m.group(2)) - int(m.group(1)) + 1) * 4096)
             for m in re.finditer(r"^\s*\d+:\s+\d+\.\.\s*\d+:\s+(\d+)\.\.\s*(\d+):", out, re.M)]
    assert found, out
    return found


def fail_reads_of(dev: FaultyDisk, path: Path) -> None:
    """Reads of ``path``'s blocks fail from now on (until ``dev.heal()``)."""
    ranges = extents(path)
    (dev.triggers / "pread").write_text("".join("%d %d\n" % r for r in ranges))
    fd = os.open(path, os.O_RDONLY)
    try:  # what site B reads next comes from the device
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def scrub_lines(lab: Lab) -> List[str]:
    return [x for x in lab.b.log.read_text().splitlines() if "periodic scrub:" in x]


def agent_up(lab: Lab) -> None:
    assert lab.b.proc is not None and lab.b.proc.poll() is None, "site B's agent died"


def restore_fails(lab: Lab, name: str, *words: str) -> str:
    dest = lab.work / name
    proc = lab.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest), check=False)
    assert proc.returncode != 0, proc.stdout
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    assert not list(lab.work.glob(name + "*")), "a failed restore left a file"
    return lines[0]


def test_read_errors_under_site_b(eio_b) -> None:
    lab, dev = eio_b
    lab.b.extra_args = ["--scrub-period", "2s"]  # the periodic scrub reads all along
    lab.b.start()
    lab.a.start()
    disk = lab.image("vda.img", SIZE)
    with open(disk, "r+b") as f:  # the initial sync writes the replica's blocks
        f.write(os.urandom(SIZE))
    uris = lab.protect("g1", disk, extra=("--history", "1h"))
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    h = nbd.NBD()
    h.connect_uri(uris["vda"])
    newer = os.urandom(256 * 1024)
    h.pwrite(newer, MiB)  # journaled: the history window keeps it out of the replica
    h.flush()
    h.shutdown()
    lab.a.ferry("checkpoint", "g1")
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    source = disk.read_bytes()
    replica = Path(lab.b.status()["replicas"]["g1"]["disks"]["vda"]["replica"])
    segments = sorted(lab.b.data.rglob("seg-*.fjr"))
    assert segments
    lines = []

    # A view: EIO to the client, one line naming the file in the view's log, never bytes.
    view = json.loads(lab.b.ferry("view", "g1", "--json").stdout)
    for path, at, what in ((replica, 0, "replica"), (segments[-1], MiB, "segment")):
        fail_reads_of(dev, path)
        v = nbd.NBD()
        v.connect_uri(view["disks"]["vda"])
        with pytest.raises(nbd.Error) as e:
            v.pread(65536, at)
        assert e.value.errnum == errno.EIO, (what, e.value.errnum, e.value.string)
        dev.heal()
        assert v.pread(65536, at) == source[at:at + 65536], what
        v.shutdown()
        logs = "".join(p.read_text() for p in (lab.b.data / "views").rglob("*.log"))
        line = next((x for x in logs.splitlines() if str(path) in x), "")
        assert "Input/output error reading" in line and "at byte" in line, (what, logs)
        lines.append(line)
        agent_up(lab)
    lab.b.ferry("view-close", view["id"])

    # A restore: one line naming the replica or the segment and the byte; no file left.
    fail_reads_of(dev, replica)
    lines.append(restore_fails(lab, "r1.img", str(replica), "at byte", "Input/output error"))
    dev.heal()
    fail_reads_of(dev, segments[-1])
    lines.append(restore_fails(lab, "r2.img", str(segments[-1]), "at byte"))
    dev.heal()
    agent_up(lab)
    assert lab.restore("g1", "vda").read_bytes() == source

    # Verify (site B hashes its newest point) and scrub: refused, named, agent up.
    fail_reads_of(dev, replica)
    proc = lab.a.ferry("verify", "g1", check=False)
    assert proc.returncode not in (0, 1), proc.stdout + proc.stderr
    assert str(replica) in proc.stderr and "at byte" in proc.stderr, proc.stderr
    lines.append(proc.stderr.strip())
    proc = lab.b.ferry("scrub", "g1", check=False)
    assert proc.returncode != 0 and str(replica) in proc.stderr, proc.stderr
    assert "at byte" in proc.stderr, proc.stderr
    lines.append(proc.stderr.strip())
    wait_for(lambda: any(str(replica) in x and "at byte" in x for x in scrub_lines(lab)),
             timeout=60, what="the periodic scrub to meet the error")
    lines.append(next(x for x in scrub_lines(lab) if str(replica) in x))
    dev.heal()
    agent_up(lab)
    assert lab.a.ferry("verify", "g1").returncode == 0

    # Failover live: refused (before it begins: a segment it checks first; half-way: the
    # replica it copies), nothing made live, the group replicates on.
    for path in (segments[-1], replica):
        fail_reads_of(dev, path)
        proc = lab.b.ferry("failover", "g1", "--live", check=False)
        assert proc.returncode != 0, proc.stdout
        assert str(path) in proc.stderr and "nothing was made live" in proc.stderr, \
            proc.stderr
        lines.append(proc.stderr.strip())
        dev.heal()
    agent_up(lab)
    g = lab.b.status()["replicas"]["g1"]
    assert not g.get("failover") and not (lab.b.data / "target" / "g1" / "live").exists(), g
    h = nbd.NBD()
    h.connect_uri(uris["vda"])
    h.pwrite(os.urandom(65536), 0)
    h.flush()
    h.shutdown()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    assert lab.restore("g1", "vda").read_bytes() == disk.read_bytes()
    print("\nread-eio: %s" % "\nread-eio: ".join(lines))


def test_failback_meets_a_read_error_of_the_live_disk(eio_b) -> None:
    lab, dev = eio_b
    lab.b.start()
    lab.a.start()
    disk = lab.image("vda.img", SIZE)
    with open(disk, "r+b") as f:
        f.write(os.urandom(SIZE))
    lab.protect("g1", disk)
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    lab.a.ferry("checkpoint", "g1")
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    out = json.loads(lab.b.ferry("failover", "g1", "--live", "--json").stdout)
    lab.b.ferry("failover", "g1", "--commit")
    wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] == "fenced",
             what="A fenced", timeout=60)
    live = lab.b.data / "target" / "g1" / "live" / "vda.img"
    assert live.exists(), out
    fail_reads_of(dev, live)
    proc = lab.b.ferry("failback", "g1", "--target", lab.a.address, check=False, timeout=120)
    agent_up(lab)
    assert proc.returncode != 0, proc.stdout
    # (The offset is not named here: the error comes from the source role's side.)
    assert proc.stderr.count("\n") == 1 and str(live) in proc.stderr, proc.stderr
    dev.heal()
    back = json.loads(lab.b.ferry("failback", "g1", "--target", lab.a.address, "--json",
                                  timeout=120).stdout)
    assert back["synced"], back
    print("\nfailback-eio: %s; healed: failed back, %d bytes shipped" % (
        proc.stderr.strip(), back["bytes_shipped"]))
