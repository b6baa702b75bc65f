"""What may be a disk, and which disk a path is.

A disk is its identity, not its name: ``(st_dev, st_ino)`` of a regular file, ``st_rdev``
of a block device, whatever path, symlink, hard link, bind mount or ``/dev/disk/by-*`` name
reaches it. ``Policy`` is a site's rule for the paths it is given (it runs as root; every
path is untrusted) and the register of the disks it holds:

- A disk is a regular file or a block device, nothing else (no FIFO, directory, character
  device or socket).
- It lies under one of the image roots (``DEFAULT_ROOTS`` plus those the administrator adds
  with ``ferry agent --image-root DIR``); block devices may also be anywhere under ``/dev``.
  The check is made on the path of the file actually opened (``/proc/self/fd``), so a link
  swapped in between the check and the open changes nothing.
- Nothing under the agent's data directory (its database, pid files, replicas, journals),
  nor a hard link elsewhere to one of those files.
- ``claim`` registers a disk for a group: one claim per identity, a second is refused
  (``Conflict``) naming the group that holds it. Claims are plain dictionary updates made
  without awaiting between check and set, so under trio exactly one of concurrent claims wins.
- ``occupy`` holds what an operation other than protection writes (a restore's new file, a
  failover's or failback's live copy) for as long as it runs: by identity for a disk that
  exists, by ``name_key`` (its directory's identity and its name) for a file not made yet.
  One holder per key, whoever it is: a second operation, or a protect of what it holds, is
  refused (``Conflict``, 409) naming the holder; an operation on a disk a group protects is
  refused naming the group, unless the operation is that group's own (``group=``). Holds
  are taken under a thread lock, so operations in worker threads race safely with claims.

An error says what is wrong in one line and, for a path outside the roots, says nothing
about the file (not whether it exists, nor its size): only the roots that apply.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from typing import Dict, Hashable, Iterable, Iterator, List, Optional, Tuple

from .errors import Conflict, Invalid, NotFound

DEFAULT_ROOTS = ("/var/lib/libvirt/images", "/var/lib/ferry-images")
BLOCK_ROOT = "/dev"

Identity = Tuple[str, int, int]  # ("file", st_dev, st_ino) or ("block", st_rdev, 0)


def identity(st: os.stat_result) -> Identity:
    if stat.S_ISBLK(st.st_mode):
        return ("block", st.st_rdev, 0)
    return ("file", st.st_dev, st.st_ino)


def check_kind(what: str, st: os.stat_result) -> None:
    """Invalid unless ``st`` is of a regular file or a block device."""
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISBLK(st.st_mode)):
        raise Invalid("%s is neither a file nor a block device" % what)


def under(path: str, root: str) -> bool:
    """``path`` is ``root`` or inside it (both absolute and real)."""
    return path == root or path.startswith(root.rstrip("/") + "/")


def fd_path(fd: int) -> str:
    """The real path of the file open as ``fd``."""
    return os.readlink("/proc/self/fd/%d" % fd)


class Policy:
    """A site's image roots and data directory, and the disks claimed on it."""

    def __init__(self, data_dir: str, roots: Iterable[str] = ()) -> None:
        self.data_dir = os.path.realpath(data_dir)
        self.roots: List[str] = []
        for r in (*DEFAULT_ROOTS, *roots):
            real = os.path.realpath(r)
            if real not in self.roots:
                self.roots.append(real)
        self.claims: Dict[Identity, Tuple[str, str]] = {}  # identity -> (group, disk)
        self.held: Dict[Hashable, str] = {}  # identity or name_key -> the operation (occupy)
        self._lock = threading.Lock()  # claims and holds change under it

    def describe_roots(self) -> str:
        return "%s, block devices under %s" % (", ".join(self.roots), BLOCK_ROOT)

    def outside(self, what: str) -> Invalid:
        return Invalid("%s is outside the image roots (%s); an administrator can add a root "
                       "(FERRY_IMAGE_ROOTS in /etc/ferry/agent.conf, or ferry agent "
                       "--image-root DIR)" % (what, self.describe_roots()))

    def in_roots(self, real: str, block: Optional[bool]) -> bool:
        """``real`` lies under a root (block devices: also under /dev; None: unknown yet)."""
        if any(under(real, r) for r in self.roots):
            return True
        return block is not False and under(real, BLOCK_ROOT)

    def in_data(self, real: str) -> bool:
        return under(real, self.data_dir)

    def check_name(self, what: str, path: str) -> str:
        """Before anything is opened: ``path`` made absolute and real, refused when it is
        outside the roots or in the data directory (nothing about the file is revealed)."""
        if not os.path.isabs(path):
            raise Invalid("%s: give an absolute path" % what)
        real = os.path.realpath(path)
        if self.in_data(real):
            raise Invalid("%s lies in the agent's data directory %s" % (what, self.data_dir))
        if not self.in_roots(real, None):
            raise self.outside(what)
        return real

    def check_open(self, what: str, fd: int) -> Tuple[str, os.stat_result]:
        """The opened file's real path and stat, or Invalid: not a file or block device,
        outside the roots, in the data directory, or a hard link to a file there."""
        st = os.fstat(fd)
        real = fd_path(fd)
        block = stat.S_ISBLK(st.st_mode)
        if self.in_data(real):
            raise Invalid("%s lies in the agent's data directory %s" % (what, self.data_dir))
        check_kind(what, st)
        if not self.in_roots(real, block):
            raise self.outside(what)
        if not block and st.st_nlink > 1 and self._data_holds(identity(st)):
            raise Invalid("%s (%s) is a hard link to a file in the agent's data directory %s"
                          % (what, real, self.data_dir))
        return real, st

    def _data_holds(self, ident: Identity) -> bool:
        for top, _dirs, files in os.walk(self.data_dir):
            for name in files:
                try:
                    st = os.lstat(os.path.join(top, name))
                except OSError:
                    continue
                if identity(st) == ident:
                    return True
        return False

    def open_disk(self, name: str, path: str, flags: int = os.O_RDWR
                  ) -> Tuple[str, int, Identity]:
        """Disk ``name`` at ``path``: its real path, size and identity, or a RequestError."""
        what = "disk %s: %s" % (name, path)
        self.check_name(what, path)
        try:  # a device is never opened unless it is a block device: opening has effects
            check_kind(what, os.stat(path))
            fd = os.open(path, flags | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
        except FileNotFoundError:
            raise NotFound("%s does not exist" % what) from None
        except OSError as e:
            raise Invalid("%s: %s" % (what, e.strerror or e)) from None
        try:
            real, st = self.check_open(what, fd)
            return real, os.lseek(fd, 0, os.SEEK_END), identity(st)
        finally:
            os.close(fd)

    # -- claims --------------------------------------------------------------------------

    def claim(self, ident: Identity, group: str, disk: str, path: str) -> None:
        """Register the disk for ``group``; Conflict naming the group that holds it
        (``path``, the name the caller used, is only for the message)."""
        with self._lock:
            held = self.claims.get(ident)
            if held is not None:
                raise Conflict("disk %s: %s is already protected (group %s, disk %s)"
                               % (disk, path, held[0], held[1]))
            op = self.held.get(ident)
            if op is not None:
                raise Conflict("disk %s: %s is being written by %s" % (disk, path, op))
            self.claims[ident] = (group, disk)

    def release(self, ident: Identity, group: str) -> None:
        with self._lock:
            if self.claims.get(ident, ("", ""))[0] == group:
                del self.claims[ident]

    @staticmethod
    def name_key(path: str) -> Hashable:
        """The key of a file not made yet: its directory's identity and its name (any path
        to that directory gives the same key). OSError if the directory is missing."""
        path = os.path.abspath(path)
        st = os.stat(os.path.dirname(path))
        return ("name", st.st_dev, st.st_ino, os.path.basename(path))

    @contextlib.contextmanager
    def occupy(self, keys: Iterable[Hashable], what: str, group: Optional[str] = None
               ) -> Iterator[None]:
        """Hold ``keys`` (identities or name keys) for the operation ``what`` while the
        ``with`` block runs; Conflict naming the holder when one is held (see the module).
        ``group``: the operation is that group's own, and may hold the group's disks."""
        keys = list(dict.fromkeys(keys))
        with self._lock:
            for k in keys:
                op = self.held.get(k)
                if op is not None:
                    raise Conflict("%s: refused, %s holds that disk" % (what, op))
                claim = self.claims.get(k)  # type: ignore[call-overload]
                if claim is not None and claim[0] != group:
                    raise Conflict("%s: refused, it is disk %s of protected group %s"
                                   % (what, claim[1], claim[0]))
            for k in keys:
                self.held[k] = what
        try:
            yield
        finally:
            with self._lock:
                for k in keys:
                    self.held.pop(k, None)

    def claimed_path(self, path: str) -> Optional[Tuple[str, str]]:
        """The (group, disk) holding the disk ``path`` reaches now, if any (no error)."""
        try:
            return self.claims.get(identity(os.stat(path)))
        except OSError:
            return None
