"""A power cut under site B: its data directory on ext4 over a loop device over nbdfuse
over a RAM disk with a volatile write cache (tests/plugins/volatile_disk.py). The cut loses
every write the disk had not been told to flush, B is killed at the same moment, the file
system is checked and mounted again from what survived. Site B must still hold everything
it had acknowledged (it acks only after fdatasync), and the oracle passes the end point."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from typing import Iterator, Optional

import nbd
import pytest
from conftest import Lab
from test_faults import wait_for

from lab.oracle import OracleWriter, check

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

MiB = 1024 * 1024
PLUGIN = Path(__file__).parent / "plugins" / "volatile_disk.py"
SIZE = 64 * MiB


class VolatileDisk:
    """The RAM disk behind nbdkit (it keeps running), the file ``path`` through nbdfuse,
    and a loop device over it with site B's file system mounted at ``mountpoint``."""

    def __init__(self, work: Path, mountpoint: Path) -> None:
        self.dir = work / "volatile"
        self.mnt = self.dir / "mnt"
        self.mnt.mkdir(parents=True)
        self.sock = self.dir / "sock"
        self.pidfile = self.dir / "nbdkit.pid"
        self.mountpoint = mountpoint
        self.fuse: Optional[subprocess.Popen] = None
        self.loop: Optional[str] = None
        subprocess.run(["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile), "python",
                        str(PLUGIN), "size=%d" % SIZE, "dir=%s" % self.dir], check=True)

    @property
    def path(self) -> Path:
        return self.mnt / "nbd"

    def attach(self, mkfs: bool = False) -> None:
        self.fuse = subprocess.Popen(["nbdfuse", str(self.mnt),
                                      "nbd+unix:///?socket=%s" % self.sock])
        wait_for(lambda: self.path.exists(), what="nbdfuse to mount")
        self.loop = subprocess.run(["losetup", "-f", "--show", str(self.path)], check=True,
                                   capture_output=True, text=True).stdout.strip()
        if mkfs:
            subprocess.run(["mkfs.ext4", "-q", "-F", self.loop], check=True)
        else:
            fsck = subprocess.run(["fsck.ext4", "-fy", self.loop], capture_output=True,
                                  text=True)
            assert fsck.returncode < 4, fsck.stdout + fsck.stderr
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", self.loop, str(self.mountpoint)], check=True)

    def cut(self) -> None:
        """The power goes out: the cache is lost now (a request makes the disk see it)."""
        (self.dir / "off").touch()
        h = nbd.NBD()
        h.connect_unix(str(self.sock))
        try:
            h.pread(4096, 0)
        except nbd.Error:
            pass  # EIO: the power is out
        h.shutdown()

    def detach(self) -> None:
        subprocess.run(["umount", str(self.mountpoint)], capture_output=True)
        subprocess.run(["umount", "-l", str(self.mountpoint)], capture_output=True)
        if self.loop:
            subprocess.run(["losetup", "-d", self.loop], capture_output=True)
            self.loop = None
        subprocess.run(["umount", "-l", str(self.mnt)], capture_output=True)
        if self.fuse is not None:
            self.fuse.terminate()
            self.fuse.wait(10)
            self.fuse = None

    def power_on(self) -> None:
        (self.dir / "off").unlink()

    def close(self) -> None:
        self.detach()
        if self.pidfile.exists():
            os.kill(int(self.pidfile.read_text()), 15)


@pytest.fixture
def volatile_b(lab: Lab) -> Iterator[tuple]:
    if os.geteuid() != 0:
        pytest.skip("a loop device needs root")
    dev = VolatileDisk(lab.work, lab.b.data)
    try:
        dev.attach(mkfs=True)
        yield lab, dev
    finally:
        lab.close()
        dev.close()


def test_power_cut_under_site_b_loses_nothing_acknowledged(volatile_b) -> None:
    lab, dev = volatile_b
    lab.b.start()
    lab.a.start()
    disk = lab.image("vda.img", 4 * MiB)
    uris = lab.protect("g1", disk, extra=("--history", "2s"))
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 4 * MiB, seed=81, blocks=512, pause=0.002)
    writer.start()
    try:
        time.sleep(2.5)
        dev.cut()
        lab.b.kill()
        acked = lab.a.status("g1")["groups"]["g1"]["disks"]["vda"]
        acked_point = (acked["last_acked_gen"], acked["last_acked_seq"])
        writes_at_cut = writer.log.acked
        dev.detach()
        lost = int((dev.dir / "lost").read_text())
        dev.power_on()
        dev.attach()
        lab.b.start()
        d = lab.b.status()["replicas"]["g1"]["disks"]["vda"]
        held = (d["durable_gen"], d["durable_seq"])
        assert held >= acked_point, "B lost acked records: holds %s, acked %s" % (
            held, acked_point)
        wait_for(lambda: lab.a.status("g1")["groups"]["g1"]["state"] == "replicating",
                 timeout=60, what="replication after the power came back")
    finally:
        barrier = writer.finish()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    v = check({"vda": str(lab.restore("g1", "vda"))}, writer.log, barrier)
    assert v.prefix == writer.log.acked > writes_at_cut, v
    print("\npower cut after %d writes (%d unflushed blocks lost by the disk, and B's page "
          "cache): B acked up to %s, held %s after the cut; oracle prefix %d of %d" % (
              writes_at_cut, lost, acked_point, held, v.prefix, writer.log.acked))
