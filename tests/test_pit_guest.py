"""Crash consistency with a real guest: every checkpoint's view recovers like a disk after a
power cut, with every file the guest had synced before it."""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from typing import Dict, List, Tuple

import pytest
from conftest import LAB_CACHE, Lab
from test_pit import wait_replicating

from lab.guest import Disk, Guest
from lab.initramfs import build_initramfs
from lab.kernel import ensure_kernel

MiB = 1024 * 1024

WRITE_AND_LOG = r"""
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
echo ferry-mounted
i=0
while [ $i -lt 60 ]; do
    i=$((i + 1))
    dd if=/dev/urandom of=/mnt/f$i bs=16k count=$((i % 7 + 1)) 2>/dev/null
    g=0
    if [ $((i % 5)) -eq 0 ]; then rm -f /mnt/f$((i - 2)); g=$((i - 2)); fi
    sync
    echo "ferry-synced f$i $(md5sum /mnt/f$i | cut -d' ' -f1) gone f$g"
done
echo ferry-done
"""

LINE = re.compile(r"^ferry-synced (f\d+) ([0-9a-f]{32}) gone (f\d+)", re.MULTILINE)


def debugfs_cat(image, path: str) -> bytes:
    return subprocess.run(["debugfs", "-R", "cat " + path, str(image)], capture_output=True,
                          check=True).stdout


@pytest.mark.guest
def test_every_checkpoint_recovers_like_a_power_cut(sites: Lab) -> None:
    disk = sites.image("vda.img", 64 * MiB)
    uri = sites.protect("vm1", disk, extra=("--checkpoint-interval", "0.3s"))["vda"]
    wait_replicating(sites, "vm1")  # no checkpoint is possible during the initial sync
    kernel = ensure_kernel(LAB_CACHE)
    initrd = build_initramfs(LAB_CACHE, WRITE_AND_LOG, sites.work / "initrd.gz")
    seen: Dict[str, Tuple[int, str]] = {}  # file -> (host wall ns when seen synced, md5)
    gone: List[Tuple[int, str]] = []
    with Guest(kernel, initrd, [Disk(uri)], sites.work / "console.log") as guest:
        guest.wait_for("^ferry-mounted", 300)
        mounted = time.time_ns()  # mkfs and mount are done: the file system exists
        deadline = time.monotonic() + 300
        while "ferry-done" not in guest.output():
            assert time.monotonic() < deadline, guest.tail()
            output = guest.output()
            now = time.time_ns()  # after the read: every line in it was printed before now
            for name, digest, removed in LINE.findall(output):
                if name not in seen:
                    seen[name] = (now, digest)
                    if removed != "f0":
                        gone.append((now, removed))
            time.sleep(0.05)
        for name, digest, removed in LINE.findall(guest.output()):
            if name not in seen:  # lines that came after the last look in the loop
                seen[name] = (time.time_ns(), digest)
                if removed != "f0":
                    gone.append((time.time_ns(), removed))
        assert guest.wait(60) == 0, guest.tail()
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "120")
    listing = json.loads(sites.b.ferry("checkpoints", "vm1", "--json").stdout)["target"]
    during = [c for c in listing if c["wall_ns"] >= mounted]
    assert len(during) >= 3, len(during)
    checked = 0
    for c in during:  # every checkpoint cut while the guest wrote
        image = sites.work / ("ck-%s.img" % c["id"])
        sites.b.ferry("restore", "vm1", "--disk", "vda", "--to", str(image),
                      "--checkpoint", c["id"])
        fix = subprocess.run(["e2fsck", "-fy", str(image)], capture_output=True, text=True)
        assert fix.returncode in (0, 1), fix.stdout + fix.stderr  # 1: it fixed something
        check = subprocess.run(["e2fsck", "-fn", str(image)], capture_output=True, text=True)
        assert check.returncode == 0, check.stdout + check.stderr
        # A removed file may be gone before its removal was logged: never check those.
        removed = {name for _t, name in gone}
        for name, (t, digest) in seen.items():
            if t < c["wall_ns"] and name not in removed:
                data = debugfs_cat(image, "/" + name)
                assert hashlib.md5(data).hexdigest() == digest, (c["id"], name)
                checked += 1
    print("checked %d checkpoints, %d file versions" % (len(during), checked))
    assert checked > 0
