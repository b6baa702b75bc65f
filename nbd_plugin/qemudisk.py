"""The protected disk when it is a qcow2 or VMDK image: the guest's disk as qemu sees it.

Standard library only. The image is opened by qemu's own block layer, in a ``qemu-nbd`` that
the splitter starts on a private Unix socket beside its state file (``STATE.qemu.sock``),
with the format pinned at ``protect`` (never probed). Allocation, zero writes, discard,
backing files and image locking are qemu's; the splitter reads and writes through NBD
(``nbdclient``), one connection per concurrent request, with the same interface and errors as
``LocalDisk``, so the change log sees every write exactly as before.

Lifetime: qemu-nbd ends when its last connection closes, and the pool keeps one open for as
long as the splitter's process lives (the connection made before nbdkit forks is inherited
by the background process). So qemu-nbd outlives the agent as the splitter does, and ends
with the splitter however the splitter ends. If qemu-nbd dies under a running splitter, the
requests in flight fail with EIO, the next request starts a new one, and the whole disk is
owed to the target (``on_lost``): writes qemu had cached but not flushed may be gone from
the image while site B holds them.
"""

from __future__ import annotations

import errno
import os
import subprocess
import threading
import time
from typing import Any, Callable, Optional

from formats import images
from formats.durable import open_append
from nbd_plugin import nbdclient
from nbd_plugin.nbdclient import Connection, Pool

START_TIMEOUT = 30.0


class QemuDisk:
    is_block = False

    def __init__(self, path: str, fmt: str, socket_path: str, log_path: str = "") -> None:
        self.path = path
        self.format = fmt
        self.socket_path = socket_path
        self.log_path = log_path
        self.on_lost: Callable[[str], None] = lambda why: None
        self._proc: Optional[subprocess.Popen] = None
        self._start_lock = threading.Lock()
        # The keeper (made before nbdkit forks) is a plain socket; the others, made as
        # requests need them, are libnbd's where it is there (nbdclient.connect).
        self._pool = Pool(lambda: self._connect(nbdclient.connect),
                          keep=lambda: self._connect(Connection))
        self._pool.on_broken = self._broken
        self.size = self._pool.size

    # -- qemu-nbd ----------------------------------------------------------------------

    def _spawn(self) -> None:
        cmd = images.qemu_nbd_command(self.path, self.format, self.socket_path)
        try:
            os.unlink(self.socket_path)
        except FileNotFoundError:
            pass
        out: Any = subprocess.DEVNULL
        if self.log_path:
            out = os.fdopen(open_append(self.log_path), "ab")  # never through a link
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out,
                                          stderr=out, close_fds=True)
        finally:
            if out is not subprocess.DEVNULL:
                out.close()

    def _connect(self, make: Callable[[str], Any]) -> Any:
        with self._start_lock:
            try:
                return make(self.socket_path)
            except (FileNotFoundError, ConnectionError):  # none yet, or one ending
                pass
            self._spawn()
            deadline = time.monotonic() + START_TIMEOUT
            while True:
                try:
                    return make(self.socket_path)
                except (FileNotFoundError, ConnectionError):  # none yet, or one ending
                    proc = self._proc
                    if proc is not None and proc.poll() is not None:
                        raise OSError(errno.EIO, "qemu-nbd for %s exited (status %s)%s"
                                      % (self.path, proc.returncode, self._see_log())) from None
                    if time.monotonic() > deadline:
                        why = "qemu-nbd for %s did not start within %g s%s" % (
                            self.path, START_TIMEOUT, self._see_log())
                        raise OSError(errno.ETIMEDOUT, why) from None
                    time.sleep(0.02)

    def _see_log(self) -> str:
        return "; see %s" % self.log_path if self.log_path else ""

    def _broken(self, e: BaseException) -> None:
        self.on_lost("qemu-nbd connection for %s broke: %s" % (self.path, e))

    def close(self) -> None:
        self._pool.close()
        if self._proc is not None:  # it ends with its last connection: wait for its locks
            _wait_exit(self._proc.pid)

    # -- the LocalDisk interface --------------------------------------------------------

    def pread(self, buf: bytearray, offset: int) -> None:
        view = memoryview(buf)
        self._pool.run(lambda c: c.pread(view, offset))

    def read(self, offset: int, length: int) -> bytes:
        buf = bytearray(length)
        self.pread(buf, offset)
        return bytes(buf)

    def pwrite(self, buf: object, offset: int, fua: bool = False) -> None:
        view = memoryview(buf)  # type: ignore[arg-type]
        self._pool.run(lambda c: c.pwrite(view, offset, fua))

    def flush(self) -> None:
        self._pool.run(lambda c: c.flush())

    def zero(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        self._pool.run(lambda c: c.zero(offset, length, may_trim, fua))

    def trim(self, offset: int, length: int, fua: bool) -> None:
        # A zero write that may unmap, not NBD trim: qemu drops a discard's unaligned head
        # and tail and, in a qcow2 v2 with a backing file, shows the backing data again;
        # the target reads a trimmed range as zeroes, so must the source.
        self.zero(offset, length, may_trim=True, fua=fua)

    @staticmethod
    def all_zero(data: bytes) -> bool:
        return data == bytes(len(data))

    def is_hole(self, offset: int, length: int) -> bool:
        return False  # read it: a range of zeroes is shipped as a zero range anyway


def _wait_exit(pid: int, timeout: float = START_TIMEOUT) -> None:
    """Wait until process ``pid`` has ended (our child or, after nbdkit forked, not)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                return  # our child, reaped
        except ChildProcessError:  # not ours (started before nbdkit forked): watch /proc
            try:
                with open("/proc/%d/stat" % pid) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                        return
            except (OSError, IndexError):
                return
        if time.monotonic() > deadline:
            os.kill(pid, 9)
            deadline = time.monotonic() + timeout
        time.sleep(0.02)
