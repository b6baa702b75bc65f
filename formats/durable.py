"""Durable files: what survives a crash, said once.

- ``write_atomic``: a small file replaced whole, through ``ReplaceFile``: after it returns
  the new content survives a crash; before, the old one does. Never both halves.
- ``ReplaceFile``: the one way Ferry replaces a file by name (state, metadata, certificates,
  pid files, indexes, live copies). The data goes to a random name in the destination's
  directory opened ``O_CREAT | O_EXCL | O_NOFOLLOW`` (so a link planted at any name is never
  written through: a taken temporary name is tried again under another), is fdatasynced,
  renamed over the destination (a link at the destination is replaced, never followed, and a
  file hard-linked to the old one keeps the old content), and the directory is fsynced.
- ``write_new`` / ``open_append``: a scratch file that must not exist yet, and a log
  appended to, both opened ``O_NOFOLLOW``.
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
from typing import Any, List, Optional, TypeVar

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


TEMP_TRIES = 16  # random temporary names tried before giving up (each taken one: EEXIST)


_S = TypeVar("_S", bound="_Scratch")


class _Scratch:
    """A file being made under a temporary name in a directory held open (``dir_fd``):
    ``discard`` (and leaving a ``with`` block without ``commit``) leaves nothing behind."""

    fd = -1
    dir_fd = -1
    _temp: Optional[str] = None

    def discard(self) -> None:
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

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.discard()


class ReplaceFile(_Scratch):
    """A file that replaces ``path`` whole when committed (see the module).

    ``fd`` is open for writing (and reading) until ``close``; ``commit`` makes the data
    durable and puts it in place, ``discard`` (or leaving the ``with`` block without a
    commit) removes the temporary name. The directory is opened once and every name is
    resolved in it: a directory renamed meanwhile does not redirect the write.
    """

    def __init__(self, path: str, mode: int = 0o600) -> None:
        self.path = os.path.abspath(path)
        self.name = os.path.basename(self.path)
        if path.endswith("/") or self.name in ("", ".", ".."):
            raise IsADirectoryError(errno.EISDIR, "not a file name", path)
        self.dir_fd = os.open(os.path.dirname(self.path),
                              os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        self.fd = -1
        self._temp = None
        try:
            for _ in range(TEMP_TRIES):
                temp = ".%s.%s.tmp" % (self.name[:200], secrets.token_hex(8))
                try:
                    self.fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                                      | os.O_CLOEXEC, mode, dir_fd=self.dir_fd)
                except FileExistsError:
                    continue
                self._temp = temp
                break
            else:
                raise FileExistsError(errno.EEXIST, "no free temporary name beside", path)
        except BaseException:
            os.close(self.dir_fd)
            raise

    def commit(self, close: bool = True) -> None:
        """fdatasync the data, rename it over ``path``, fsync the directory; after this
        returns the new content and its name survive a crash. With ``close=False`` the file
        stays open (``fd``) for a caller that goes on using it in place."""
        assert self._temp is not None, "committed twice"
        os.fdatasync(self.fd)
        os.rename(self._temp, self.name, src_dir_fd=self.dir_fd, dst_dir_fd=self.dir_fd)
        self._temp = None
        os.fsync(self.dir_fd)
        if close:
            self.close()

    def detach(self) -> int:
        """Hand the open file to the caller (after ``commit(close=False)``)."""
        fd, self.fd = self.fd, -1
        self.close()
        return fd



def write_atomic(path: str, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data``; when this returns, the new content survives a crash,
    and a crash before leaves the old content (see the module)."""
    with ReplaceFile(path, mode) as f:
        view = memoryview(data)
        while view:
            view = view[os.write(f.fd, view):]
        f.commit()


def write_new(path: str, data: bytes, mode: int = 0o600) -> None:
    """Create ``path``, which must not exist (FileExistsError for any name there, a link
    included), with ``data``. Not synced: for scratch files a crash may lose."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 mode)
    try:
        write_all(fd, [data])
    finally:
        os.close(fd)


def open_append(path: str, mode: int = 0o640) -> int:
    """Open the log ``path`` for appending, made if missing; a symlink there is refused
    (ELOOP), never followed. Returns the fd."""
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                   mode)


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


class NewFile(_Scratch):
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
        self._temp = None
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

