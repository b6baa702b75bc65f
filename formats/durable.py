"""Durable files: what survives a crash, said once.

- ``write_atomic``: a small file replaced whole. Written to a temporary name in the same
  directory, fdatasynced, renamed over the old one, and the directory fsynced: after it
  returns the new content survives a crash; before, the old one does. Never both halves.
- ``fsync_dir`` / ``fsync_parent``: a name made, renamed or removed in a directory is
  durable once the directory is fsynced.
- ``write_all`` / ``pwrite_all``: every byte written (short writes continued); durability
  is the caller's fdatasync.
"""

from __future__ import annotations

import os
from typing import Any, List

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
