"""Is an image or block device in use by another writer? Asked before a disk is protected.

A disk that a running qemu (or anything else) writes must never get a splitter in front of
it behind that writer's back: its writes would bypass the splitter and the replica would
silently diverge. Two signs are checked:

- a lock on the file: qemu holds open file description (OFD) locks on the images it has
  open (bytes 100-2xx); ``F_OFD_GETLK`` for a write lock over the whole file sees them
  (and any POSIX lock), but an OFD lock has no owner pid, so
- the holder is found by the open file: every ``/proc/PID/fd/*`` that is the same inode
  (or, for a block device, the same device), named with its command;
- a block device another process opened ``O_EXCL`` (mounted, an LV, a running qemu's
  ``host_device``) refuses our own ``O_EXCL`` open with EBUSY.

The one holder let through is the one Ferry itself is attaching: while a running domain is
attached live, ``expecting`` names its qemu for its images.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import struct
from typing import Dict, Iterator, List, Set, Tuple

from .errors import Conflict

F_OFD_GETLK = 36  # linux/fcntl.h
_expected: Dict[Tuple[int, int], Set[int]] = {}  # (dev, ino) or (0, rdev): pids let through


def _key(st: os.stat_result) -> Tuple[int, int]:
    return (0, st.st_rdev) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)


@contextlib.contextmanager
def expecting(paths: List[str], pids: List[int]) -> Iterator[None]:
    """Within the block, ``pids`` holding one of ``paths`` is not "in use"."""
    keys = [_key(os.stat(p)) for p in paths]
    for k in keys:
        _expected.setdefault(k, set()).update(pids)
    try:
        yield
    finally:
        for k in keys:
            _expected.pop(k, None)
_FLOCK = struct.Struct("hhqqi4x")  # struct flock: type, whence, start, len, pid


def locked(fd: int) -> bool:
    """True if another open file holds a lock that a write lock on the whole file meets."""
    arg = _FLOCK.pack(fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
    lock_type = _FLOCK.unpack(fcntl.fcntl(fd, F_OFD_GETLK, arg))[0]
    return bool(lock_type != fcntl.F_UNLCK)


def holders(st: os.stat_result) -> List[Tuple[int, str]]:
    """(pid, command) of the other processes that have this file or device open."""
    block = stat.S_ISBLK(st.st_mode)
    out = []
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        if pid == os.getpid():
            continue
        fd_dir = "/proc/%d/fd" % pid
        try:
            fds = os.listdir(fd_dir)
        except OSError:
            continue
        for fd in fds:
            try:
                other = os.stat(os.path.join(fd_dir, fd))
            except OSError:
                continue
            same = (other.st_rdev == st.st_rdev) if block else (
                other.st_dev == st.st_dev and other.st_ino == st.st_ino)
            if same and stat.S_IFMT(other.st_mode) == stat.S_IFMT(st.st_mode):
                out.append((pid, _comm(pid)))
                break
    return out


def _comm(pid: int) -> str:
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"


def refuse_if_in_use(name: str, path: str) -> None:
    """Raise ``Conflict`` (one line, naming the holder) if another process writes ``path``."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        busy = locked(fd)
    finally:
        os.close(fd)
    why = "holds a lock on it"
    if not busy and stat.S_ISBLK(st.st_mode):
        try:
            os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        except OSError as e:
            if e.errno != errno.EBUSY:
                raise
            busy, why = True, "has it open exclusively (mounted, or a VM's device)"
    if not busy:
        return
    found = holders(st)
    if found and all(pid in _expected.get(_key(st), ()) for pid, _c in found):
        return  # the domain Ferry is attaching, and only it
    who = ", ".join("%s (pid %d)" % (comm, pid) for pid, comm in found) or "another process"
    raise Conflict("disk %s: %s is in use: %s %s; a running VM would write it behind the "
                   "splitter's back (shut it down first, or protect its libvirt domain "
                   "with --domain)" % (name, path, who, why))
