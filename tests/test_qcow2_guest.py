"""A real guest (qemu TCG, Debian kernel) on a qcow2 image through Ferry writes ext4; the
qcow2 restored on site B passes e2fsck and holds the guest's files."""

from __future__ import annotations

import subprocess

import pytest
from conftest import LAB_CACHE, Lab
from test_guest import WRITE_FILES

from lab.guest import Disk, Guest
from lab.initramfs import build_initramfs
from lab.kernel import ensure_kernel

MiB = 1024 * 1024


@pytest.mark.guest
def test_guest_on_qcow2_writes_ext4_and_the_qcow2_restore_passes_fsck(sites: Lab) -> None:
    disk = sites.work / "vda.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(disk), "128M"], check=True)
    uri = sites.protect("vm1", disk)["vda"]
    kernel = ensure_kernel(LAB_CACHE)
    initrd = build_initramfs(LAB_CACHE, WRITE_FILES, sites.work / "initrd.gz")
    with Guest(kernel, initrd, [Disk(uri)], sites.work / "console.log") as guest:
        rc = guest.wait(240)
        assert rc == 0, guest.tail()
        assert "guest-done" in guest.output()
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "120")
    restored = sites.work / "restored.qcow2"
    sites.b.ferry("restore", "vm1", "--disk", "vda", "--to", str(restored), "--format", "qcow2")
    flat = sites.work / "restored.raw"   # e2fsck reads raw: the qcow2's guest view
    subprocess.run(["qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(restored), str(flat)],
                   check=True)
    fsck = subprocess.run(["e2fsck", "-fn", str(flat)], capture_output=True, text=True)
    assert fsck.returncode == 0, fsck.stdout + fsck.stderr
    debugfs = subprocess.run(["debugfs", "-R", "cat /hello.txt", str(flat)],
                             capture_output=True, check=True)
    assert debugfs.stdout == b"hello from the guest\n"
    sites.a.ferry("unprotect", "vm1")
    subprocess.run(["qemu-img", "check", str(disk)], check=True, capture_output=True)
    compare = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(disk),
                              str(restored)], capture_output=True, text=True)
    assert compare.returncode == 0, compare.stdout + compare.stderr
