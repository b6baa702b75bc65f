"""A real guest: qemu (TCG) with a Debian kernel writes ext4 through the splitter."""

from __future__ import annotations

import hashlib
import subprocess

import pytest
from conftest import LAB_CACHE, Lab, first_difference, same_bytes

from lab.guest import Disk, Guest
from lab.initramfs import build_initramfs
from lab.kernel import ensure_kernel

MiB = 1024 * 1024

WRITE_FILES = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
mkdir -p /mnt/dir
i=0
while [ $i -lt 24 ]; do
    dd if=/dev/urandom of=/mnt/dir/file$i bs=16k count=$((i * 3 + 1)) 2>/dev/null
    [ $((i % 6)) -eq 5 ] && sync
    i=$((i + 1))
done
echo "hello from the guest" > /mnt/hello.txt
rm /mnt/dir/file3
(cd /mnt && md5sum hello.txt dir/*) > /mnt/MANIFEST
sync
umount /mnt
echo guest-done
"""


def debugfs_cat(image, path: str) -> bytes:
    proc = subprocess.run(["debugfs", "-R", "cat " + path, str(image)], capture_output=True,
                          check=True)
    return proc.stdout


@pytest.mark.guest
def test_guest_writes_ext4_and_the_replica_passes_fsck(sites: Lab) -> None:
    disk = sites.image("vda.img", 256 * MiB)
    uri = sites.protect("vm1", disk)["vda"]
    kernel = ensure_kernel(LAB_CACHE)
    initrd = build_initramfs(LAB_CACHE, WRITE_FILES, sites.work / "initrd.gz")
    with Guest(kernel, initrd, [Disk(uri)], sites.work / "console.log") as guest:
        rc = guest.wait(240)
        assert rc == 0, guest.tail()
        assert "guest-done" in guest.output()
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "120")
    restored = sites.restore("vm1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    fsck = subprocess.run(["e2fsck", "-fn", str(restored)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    manifest = debugfs_cat(restored, "/MANIFEST").decode().splitlines()
    assert len(manifest) == 24  # hello.txt and 23 files (file3 was removed)
    for line in manifest:
        digest, name = line.split()
        assert hashlib.md5(debugfs_cat(restored, "/" + name)).hexdigest() == digest, name
    assert debugfs_cat(restored, "/hello.txt") == b"hello from the guest\n"
