"""Durable files: what survives a crash, said once.

- ``write_atomic``: a small file replaced whole. Written to a temporary name in the same
  directory, fdatasynced, renamed over the old one, and the directory fsynced: after it
  returns the new content survives a crash; before, the old one does. Never both halves.
- ``fsync_dir`` / ``fsync_parent``: a name made, renamed or removed in a directory is
  durable once the directory is fsynced.
- ``write_all`` / ``pwrite_all``: every byte written (short writes continued); durability
  is the caller's fdatasync.
- ``NewFile``: a file that must not exist yet (a restore, an export), written unnamed and
  linked into place: it never replaces anything and never writes through a planted link.
"""

from __future__ import annotations

import errno
import os
import secrets
from typing import Any, List, Optional

IOV_MAX = 1024  # Linux's limit on the buffers of one writev


def fsync_dir(path: str) -> None:
    """Make the names in directory ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_parent(path: str) -> None:
    """Make ``path``'s name (made, renamed or removed) durable in its directory."""
    fsync_dir(os.path.dirname(os.path.abspath(path)) or ".")


def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``; when this returns, the new content survives a crash,
    and a crash before leaves the old content (see the module)."""
    tmp = path + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW,
                 mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)
    fsync_parent(path)


def write_all(fd: int, parts: List[Any]) -> int:
    """Write ``parts`` one after the other with as few writev calls as it takes (no join:
    the data is written from the buffers it is in). Returns the bytes written."""
    views = [memoryview(p) for p in parts if len(p)]
    total = sum(v.nbytes for v in views)
    i = 0
    while i < len(views):
        n = os.writev(fd, views[i:i + IOV_MAX])
        while n:  # drop what was written, keep the rest of a part written in part
            if n >= views[i].nbytes:
                n -= views[i].nbytes
                i += 1
            else:
                views[i] = views[i][n:]
                n = 0
    return total


def pwrite_all(fd: int, data: Any, offset: int) -> None:
    """Write all of ``data`` at ``offset``."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


class NewFile:
    """A file made under a name that must not exist yet, never through a link.

    The data is written to an unnamed file (``O_TMPFILE``) in the destination's directory,
    or, where the file system has no unnamed files, to a random name made ``O_EXCL |
    O_NOFOLLOW``. ``commit`` fdatasyncs it and gives it its name with ``link``, which
    refuses an existing name of any kind (a file, a planted symlink, a directory) with
    FileExistsError and never follows one; then the directory is fsynced: after ``commit``
    returns, the file and its name survive a crash. ``discard`` (or leaving the ``with``
    block on an error) leaves nothing behind. The directory is opened ``O_NOFOLLOW``: a
    symlink in its place is refused.
    """

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = os.path.abspath(path)
        self.name = os.path.basename(self.path)
        if path.endswith("/") or self.name in ("", ".", ".."):
            raise IsADirectoryError(errno.EISDIR, "not a file name", path)
        self.dir_fd = os.open(os.path.dirname(self.path), os.O_RDONLY | os.O_DIRECTORY
                              | os.O_NOFOLLOW | os.O_CLOEXEC)
        self._temp: Optional[str] = None
        try:
            if os.path.lexists(self.path):
                raise FileExistsError(errno.EEXIST, "already exists", self.path)
            try:
                self.fd = os.open(".", os.O_TMPFILE | os.O_RDWR | os.O_CLOEXEC, mode,
                                  dir_fd=self.dir_fd)
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                    raise
                self._temp = ".%s.%s.partial" % (self.name, secrets.token_hex(6))
                self.fd = os.open(self._temp, os.O_RDWR | os.O_CREAT | os.O_EXCL
                                  | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=self.dir_fd)
        except BaseException:
            os.close(self.dir_fd)
            raise

    def commit(self) -> None:
        """Make the data durable and give the file its name (FileExistsError if taken)."""
        os.fdatasync(self.fd)
        if self._temp is None:
            os.link("/proc/self/fd/%d" % self.fd, self.name, dst_dir_fd=self.dir_fd,
                    follow_symlinks=True)
        else:
            os.link(self._temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd,
                    follow_symlinks=False)
            os.unlink(self._temp, dir_fd=self.dir_fd)
            self._temp = None
        os.fsync(self.dir_fd)
        self.close()

    def discard(self) -> None:
        """Leave nothing behind."""
        if self._temp is not None:
            try:
                os.unlink(self._temp, dir_fd=self.dir_fd)
            except FileNotFoundError:
                pass
            self._temp = None
        self.close()

    def close(self) -> None:
        for attr in ("fd", "dir_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    def __enter__(self) -> NewFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()
