"""``make demo``: two sites on this machine, a real guest writing, the replica verified.

Site A and site B are two ``ferry agent`` processes with their own data directories and
ports. A disk image on site A is protected to site B; a tiny Linux guest (qemu, TCG) boots
with that disk on the splitter's NBD URI, makes an ext4 file system and writes files for a
while; ``ferry status`` is shown as it runs, and a checkpoint is tagged after its third
round. Then site B restores the replica to a file, which must be byte-identical to the
source image and pass ``e2fsck``; site B lists its checkpoints, runs a test failover from
the tagged checkpoint (copied out with nbdcopy and checked with e2fsck) and restores that
checkpoint. The last line says whether the replica matches; the exit status is 0 only if
it does.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .guest import Disk, Guest
from .initramfs import build_initramfs
from .kernel import ensure_kernel
from .sites import REPO, Site

MiB = 1024 * 1024
GUEST_SCRIPT = r"""
echo "guest: making an ext4 file system on /dev/vda"
mkfs.ext4 -q -F /dev/vda
mount -t ext4 /dev/vda /mnt
round=0
while [ $round -lt 6 ]; do
    mkdir -p /mnt/round$round
    i=0
    while [ $i -lt 8 ]; do
        dd if=/dev/urandom of=/mnt/round$round/file$i bs=64k count=$((i + 4)) 2>/dev/null
        i=$((i + 1))
    done
    sync
    echo "guest: round $round written and synced"
    round=$((round + 1))
done
(cd /mnt && find . -type f | sort | xargs md5sum) > /mnt/MANIFEST
sync
umount /mnt
echo "guest: done, file system unmounted"
"""


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(4 * MiB), b""):
            h.update(chunk)
    return h.hexdigest()


def say(text: str) -> None:
    print(text, flush=True)


def show(cmd: str, proc: subprocess.CompletedProcess) -> None:
    say("$ " + cmd)
    out = (proc.stdout + proc.stderr).rstrip()
    if out:
        say(out)


def main() -> int:
    work = Path(os.environ.get("FERRY_DEMO_DIR", "/tmp/ferry-demo"))
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cache = REPO / ".cache" / "lab"
    a, b = Site("A", work, insecure=False), Site("B", work, insecure=False)
    say("== Ferry demo: two sites on this machine, working in %s" % work)
    say("-- preparing the guest (Debian cloud kernel + busybox initramfs)")
    kernel = ensure_kernel(cache)
    initrd = build_initramfs(cache, GUEST_SCRIPT, work / "initrd.gz")
    disk = work / "vm1-disk.img"
    with open(disk, "wb") as f:
        f.truncate(256 * MiB)
    try:
        b.start()
        a.start()
        say("-- site B (target) agent: replication %s, API %s" % (b.address, b.api_url))
        say("-- site A (source) agent: replication %s, API %s" % (a.address, a.api_url))
        say("-- pairing the sites (replication runs over mutual TLS between paired sites)")
        token = b.ferry("pair-token")
        show("ferry --api %s pair-token" % b.api_url, token)
        show("ferry --api %s pair %s --token %s" % (a.api_url, b.address, token.stdout.strip()),
             a.ferry("pair", b.address, "--token", token.stdout.strip()))
        cmd = "ferry --api %s protect vm1 --disk vda=%s --target %s" % (a.api_url, disk,
                                                                        b.address)
        proc = a.ferry("protect", "vm1", "--disk", "vda=%s" % disk, "--target", b.address)
        show(cmd, proc)
        uri = proc.stdout.split("\t")[1].strip()
        say("-- booting the guest with its virtio disk on %s" % uri)
        with Guest(kernel, initrd, [Disk(uri)], work / "console.log") as guest:
            seen = 0
            tagged = False
            next_status = time.monotonic() + 2
            while True:
                text = guest.output()
                for line in text[seen:].splitlines():
                    if line.startswith("guest:"):
                        say("   " + line.strip())
                seen = len(text) - len(text.rsplit("\n", 1)[-1])
                if not tagged and "round 2 written and synced" in text:
                    tagged = True
                    show("ferry --api %s checkpoint vm1 --tag after-round-2" % a.api_url,
                         a.ferry("checkpoint", "vm1", "--tag", "after-round-2"))
                if "FERRY-GUEST-EXIT" in text:
                    break
                if time.monotonic() >= next_status:
                    show("ferry --api %s status" % a.api_url, a.ferry("status"))
                    next_status = time.monotonic() + 4
                if guest.pid is None:
                    break
                time.sleep(0.25)
            rc = guest.wait(60)
        if rc != 0:
            say("guest failed with exit %d; console in %s" % (rc, work / "console.log"))
            say("MISMATCH: the guest did not finish its writes")
            return 1
        show("ferry --api %s wait vm1 --synced" % a.api_url,
             a.ferry("wait", "vm1", "--synced", "--timeout", "120"))
        show("ferry --api %s status" % a.api_url, a.ferry("status"))
        restored = work / "vm1-restored.img"
        show("ferry --api %s restore vm1 --disk vda --to %s" % (b.api_url, restored),
             b.ferry("restore", "vm1", "--disk", "vda", "--to", str(restored)))
        fsck = subprocess.run(["e2fsck", "-fn", str(restored)], capture_output=True, text=True)
        say("$ e2fsck -fn %s -> exit %d" % (restored, fsck.returncode))
        src, dst = sha256(disk), sha256(restored)
        say("source   sha256 %s" % src)
        say("replica  sha256 %s" % dst)
        point_in_time(a, b, work)
        a.ferry("unprotect", "vm1")
        if src == dst and fsck.returncode == 0:
            say("MATCH: the replica restored on site B is identical to the source disk "
                "and its ext4 file system is clean")
            return 0
        say("MISMATCH: the replica restored on site B differs from the source disk"
            if src != dst else "MISMATCH: the replica's file system is not clean")
        return 1
    finally:
        for site in (a, b):
            site.stop()
            site.kill_splitters()


def point_in_time(a: Site, b: Site, work: Path) -> None:
    """Checkpoints on site B, a test failover from the tagged one, a restore of it."""
    proc = b.ferry("checkpoints", "vm1")
    lines = proc.stdout.rstrip().splitlines()
    if len(lines) > 10:
        lines = [*lines[:4], "  ... (%d more)" % (len(lines) - 8), *lines[-4:]]
    say("$ ferry --api %s checkpoints vm1" % b.api_url)
    say("\n".join(lines))
    show("ferry --api %s failover vm1 --test --checkpoint after-round-2" % b.api_url,
         proc := b.ferry("failover", "vm1", "--test", "--checkpoint", "after-round-2"))
    uri = proc.stdout.strip().splitlines()[-1].split("\t")[1]
    copy = work / "vm1-test.img"
    subprocess.run(["nbdcopy", uri, str(copy)], check=True)
    fix = subprocess.run(["e2fsck", "-fy", str(copy)], capture_output=True, text=True)
    check = subprocess.run(["e2fsck", "-fn", str(copy)], capture_output=True, text=True)
    say("$ nbdcopy %s %s; e2fsck -fy -> exit %d; e2fsck -fn -> exit %d"
        % (uri, copy, fix.returncode, check.returncode))
    show("ferry --api %s failover vm1 --stop-test" % b.api_url,
         b.ferry("failover", "vm1", "--stop-test"))
    restored = work / "vm1-after-round-2.img"
    show("ferry --api %s restore vm1 --disk vda --checkpoint after-round-2 --to %s"
         % (b.api_url, restored),
         b.ferry("restore", "vm1", "--disk", "vda", "--checkpoint", "after-round-2",
                 "--to", str(restored)))


if __name__ == "__main__":
    sys.exit(main())
