"""A block device as the protected disk (a loop device here): its size from BLKGETSIZE64,
zeroes with BLKZEROOUT, no trim offered; replicated like a file."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Iterator

import nbd
import pytest
from conftest import Lab, same_bytes

from nbd_plugin.disk import LocalDisk

MiB = 1024 * 1024


@pytest.fixture
def loop_device(tmp_path: Path) -> Iterator[Path]:
    backing = tmp_path / "backing.img"
    with open(backing, "wb") as f:
        f.truncate(32 * MiB)
    proc = subprocess.run(["losetup", "--find", "--show", str(backing)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip("no loop device here: %s" % proc.stderr.strip())
    dev = Path(proc.stdout.strip())
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", str(dev)], check=False)


def test_local_disk_on_a_block_device(loop_device: Path) -> None:
    disk = LocalDisk(str(loop_device))
    try:
        assert disk.is_block and disk.size == 32 * MiB
        disk.pwrite(b"\xff" * MiB, 2 * MiB)
        disk.zero(2 * MiB + 4096, 64 * 1024, may_trim=True, fua=True)
        data = disk.read(2 * MiB, 2 * 4096 + 64 * 1024)
        assert data[:4096] == b"\xff" * 4096
        assert data[4096:4096 + 64 * 1024] == bytes(64 * 1024)
        assert data[4096 + 64 * 1024:] == b"\xff" * 4096
        assert not disk.is_hole(0, 4096)  # a device has no holes to skip
        with pytest.raises(OSError, match="not offered on block devices"):
            disk.trim(0, 4096, fua=False)
    finally:
        disk.close()


def test_protect_a_block_device(sites: Lab, loop_device: Path) -> None:
    with open(loop_device, "r+b") as f:
        f.seek(MiB)
        f.write(os.urandom(4 * MiB))  # data before protection: the initial sync ships it
    out = sites.a.ferry("protect", "g1", "--disk", "vda=%s" % loop_device, "--target",
                        sites.b.address).stdout
    uri = out.split("\t")[1].strip()
    h = nbd.NBD()
    h.connect_uri(uri)
    try:
        assert h.get_size() == 32 * MiB
        assert not h.can_trim()
        h.pwrite(os.urandom(MiB), 10 * MiB)
        h.zero(2 * MiB, 512 * 1024)  # count, offset: over data written before (BLKZEROOUT)
        h.flush()
    finally:
        h.shutdown()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    restored = sites.restore("g1", "vda")
    copy = sites.work / "device-copy.img"
    subprocess.run(["dd", "if=%s" % loop_device, "of=%s" % copy, "bs=1M", "status=none"],
                   check=True)
    assert same_bytes(copy, restored)
    assert open(copy, "rb").read()[MiB:MiB + 4096] == bytes(4096)
