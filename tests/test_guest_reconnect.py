"""kill -9 of the splitter under a real guest: qemu's NBD client reconnects to the splitter
the agent starts again, the guest sees no I/O error, and site B ends identical to the
source after resyncing only the extents written lately (the activity log)."""

from __future__ import annotations

import time

import pytest
from conftest import LAB_CACHE, Lab, first_difference, same_bytes

from lab.guest import Disk, Guest
from lab.initramfs import build_initramfs
from lab.kernel import ensure_kernel

MiB = 1024 * 1024

WRITER = r"""
mkfs.ext4 -q -F -E nodiscard,lazy_itable_init=0 /dev/vda
mount -t ext4 /dev/vda /mnt
echo ferry-mounted
# A VM that has run a while: what mkfs wrote is acked and idle by now.
sleep 8
i=0
while [ $i -lt 40 ]; do
    dd if=/dev/urandom of=/mnt/file$i bs=16k count=8 2>/dev/null
    sync
    echo "ferry-wrote $i"
    i=$((i + 1))
    sleep 0.1
done
(cd /mnt && md5sum file*) > /mnt/MANIFEST
sync
umount /mnt
echo guest-done
"""


@pytest.mark.guest
def test_guest_survives_a_killed_splitter(sites: Lab) -> None:
    size = 512 * MiB
    disk = sites.image("vda.img", size)
    uri = sites.protect("vm1", disk)["vda"]
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "120")
    kernel = ensure_kernel(LAB_CACHE)
    initrd = build_initramfs(LAB_CACHE, WRITER, sites.work / "initrd.gz")
    gen = sites.a.status("vm1")["groups"]["vm1"]["disks"]["vda"]["generation"]
    with Guest(kernel, initrd, [Disk(uri, reconnect_delay=10)],
               sites.work / "console.log") as guest:
        guest.wait_for(r"^ferry-wrote 5", 240)
        sites.a.kill_splitters()  # kill -9, writes in flight
        deadline = time.monotonic() + 30
        while sites.a.status("vm1")["groups"]["vm1"]["disks"]["vda"]["generation"] == gen:
            assert time.monotonic() < deadline, "the agent did not restart the splitter"
            time.sleep(0.2)
        rc = guest.wait(300)
        assert rc == 0, guest.tail()
        out = guest.output()
        assert "guest-done" in out
        assert "I/O error" not in out and "EXT4-fs error" not in out, guest.tail()
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "120")
    restored = sites.restore("vm1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    resynced = sites.a.status("vm1")["groups"]["vm1"]["disks"]["vda"]["resync_bytes"]
    print("resynced after the kill: %d MiB of a %d MiB disk" % (resynced >> 20, size >> 20))
    assert resynced < size // 2, "resynced %d bytes of a %d-byte disk" % (resynced, size)
