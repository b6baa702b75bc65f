"""A disk that fails on purpose, for tests of I/O errors under either site: a RAM disk
behind nbdkit (tests/plugins/faulty_disk.py) exposed as a file by nbdfuse, and, for a file
system on it, a loop device and an ext4 mounted over a directory."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path
from typing import Iterator

from test_faults import wait_for

PLUGIN = Path(__file__).parent / "plugins" / "faulty_disk.py"


class FaultyDisk:
    """A RAM disk behind nbdkit, as the file ``path`` (nbdfuse); ``fail(op)`` makes op
    (pread, pwrite, flush) fail with EIO until ``heal()``."""

    def __init__(self, work: Path, size: int) -> None:
        self.dir = work / "faulty"
        self.triggers = self.dir / "triggers"
        self.mnt = self.dir / "mnt"
        self.triggers.mkdir(parents=True)
        self.mnt.mkdir()
        self.sock = self.dir / "sock"
        self.pidfile = self.dir / "nbdkit.pid"
        subprocess.run(["nbdkit", "-U", str(self.sock), "-P", str(self.pidfile), "python",
                        str(PLUGIN), "size=%d" % size, "dir=%s" % self.triggers], check=True)
        self.fuse = subprocess.Popen(["nbdfuse", str(self.mnt),
                                      "nbd+unix:///?socket=%s" % self.sock])
        self.path = self.mnt / "nbd"
        wait_for(lambda: self.path.exists(), what="nbdfuse to mount")

    def fail(self, *ops: str) -> None:
        for op in ops:
            (self.triggers / op).touch()

    def heal(self) -> None:
        for p in self.triggers.iterdir():
            p.unlink()

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.mnt)], check=False)
        self.fuse.terminate()
        self.fuse.wait(10)
        if self.pidfile.exists():
            os.kill(int(self.pidfile.read_text()), 15)


class FaultyFs:
    """ext4 (no journal, ``errors=continue``: an I/O error fails the call that meets it,
    the file system stays writable once the device answers) on a ``FaultyDisk`` through a
    loop device, mounted on ``where``."""

    def __init__(self, disk: FaultyDisk, where: Path) -> None:
        self.disk, self.where = disk, where
        subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(disk.path)],
                       check=True)
        self.loop = subprocess.run(["losetup", "--find", "--show", str(disk.path)],
                                   check=True, capture_output=True, text=True).stdout.strip()
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "errors=continue", self.loop, str(where)], check=True)

    def close(self) -> None:
        subprocess.run(["umount", "-l", str(self.where)], check=False)
        subprocess.run(["losetup", "-d", self.loop], check=False)


@contextlib.contextmanager
def ext4_on(dev: FaultyDisk, where: Path, direct_io: bool = False) -> Iterator[None]:
    """ext4 (no journal, ``errors=continue``) made on ``dev`` and mounted on ``where``
    through a loop device (``direct_io``: reads reach the device, not nbdfuse's page cache);
    unmounted (lazily if busy) and the loop device freed on the way out."""
    subprocess.run(["mkfs.ext4", "-q", "-F", "-O", "^has_journal", str(dev.path)], check=True)
    loop = subprocess.run(["losetup", "--find", "--show"]
                          + (["--direct-io=on"] if direct_io else []) + [str(dev.path)],
                          check=True, capture_output=True, text=True).stdout.strip()
    try:
        where.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-o", "errors=continue", loop, str(where)], check=True)
        try:
            yield
        finally:
            if subprocess.run(["umount", str(where)], capture_output=True).returncode:
                subprocess.run(["umount", "-l", str(where)], check=False)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)
