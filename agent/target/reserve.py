"""A journal's reserved space: the file system blocks of a group's journal, allocated when
the group is protected with ``--journal-reserve`` and never given back while it is.

Theory of operation. The reserve is a pool of *slots*, each ``slot`` bytes of allocated
(fallocate ``KEEP_SIZE``: the file's size stays 0) space in a file of ``journal/``:

- ``spare-<n>.fjs``: a slot nobody uses (size 0, blocks allocated). The journal's segment
  pattern does not match the name, so every reader of the journal ignores it.
- ``seg-<n>.fjr``: a segment made from a spare by a rename (no byte of it written yet, so a
  crash leaves an empty segment, never old records). Appends write into its allocation; the
  journal closes a reserved segment before a batch that would pass its slot.
- a segment the promoter is done with is renamed back to a spare (its blocks kept), cut to
  size 0 and allocated again up to its slot (``recycle``). Between the cut and the
  allocation its blocks are free for an instant: the one window in which another writer of
  the file system can take them.
- ``room.fjs``: ``ROOM`` bytes kept for the small files written beside the segments (index
  files, ``meta.json``): ``make_room`` gives back what they need when the file system has
  none free (``room_for``), ``refill`` takes it again after segments were recycled.

The reserve's size for a journal limit of ``journal_max`` bytes is ``slots`` slots of
``slot`` bytes (``plan``): the limit's worth, one for the segment being written and one for
what arrives before the promoter applies, plus ``ROOM``. ``check`` refuses (``ReserveError``,
the numbers and the file system named) when the file system has less free space than the
part not yet allocated.
"""

from __future__ import annotations

import errno
import logging
import os
import re
from typing import Any, Callable, Dict, List, Tuple

from formats.blockdev import FALLOC_FL_KEEP_SIZE, fallocate
from formats.durable import fsync_dir

from ..errors import Unavailable

MiB = 1024 * 1024
SLOT_MIN = 8 * MiB          # more than the largest batch (shipper.MAX_BATCH and its headers)
SLOT_MAX = 64 * MiB         # journal.SEGMENT_MAX
ROOM = 2 * MiB              # index files and meta.json
_SPARE_RE = re.compile(r"^spare-(\d{16})\.fjs$")
ROOM_NAME = "room.fjs"

log = logging.getLogger("ferry.replica")


class ReserveError(Unavailable):
    """The file system cannot hold the journal's reserve (503 over HTTP; protect: 409)."""


def plan(journal_max: int) -> Tuple[int, int]:
    """(slot bytes, slots) of the reserve for a journal limit of ``journal_max`` bytes."""
    slot = max(SLOT_MIN, min(SLOT_MAX, journal_max // 4))
    return slot, -(-journal_max // slot) + 2


def total(journal_max: int) -> int:
    """The bytes a reserve for ``journal_max`` takes."""
    slot, slots = plan(journal_max)
    return slot * slots + ROOM


def mount_of(path: str) -> str:
    """The mount point of the file system that holds ``path``."""
    path = os.path.realpath(path)
    while not os.path.ismount(path):
        path = os.path.dirname(path)
    return path


def free_bytes(path: str, root: bool = False) -> int:
    """Bytes free to anyone on ``path``'s file system (``root``: also those kept for root,
    which the agent's own small writes may use)."""
    st = os.statvfs(path)
    return (st.f_bfree if root else st.f_bavail) * st.f_frsize


def allocated(directory: str) -> int:
    """Bytes allocated to the journal's files (segments, spares, room, indexes)."""
    out = 0
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return 0
    for name in names:
        try:
            out += os.lstat(os.path.join(directory, name)).st_blocks * 512
        except FileNotFoundError:
            pass
    return out


def check(group: str, directory: str, journal_max: int) -> None:
    """ReserveError unless the file system of ``directory`` (the journal, or the first
    existing parent) can hold the reserve for ``journal_max``. Changes nothing."""
    where = directory
    while not os.path.exists(where):
        where = os.path.dirname(where)
    need = max(0, total(journal_max) - allocated(directory))
    free = free_bytes(where)
    if need > free:
        raise ReserveError(
            "group %s: the journal reserve for --journal-max %d needs %d more bytes on the "
            "file system at %s (%s); only %d are free" % (
                group, journal_max, need, mount_of(where), directory, free))


class Reserve:
    """The reserved slots of one journal directory (see the module)."""

    def __init__(self, group: str, directory: str, journal_max: int) -> None:
        self.group = group
        self.directory = directory
        self.journal_max = journal_max
        self.slot, self.slots = plan(journal_max)

    @property
    def size(self) -> int:
        return self.slot * self.slots + ROOM

    def _spares(self) -> List[int]:
        return sorted(int(m.group(1)) for m in map(_SPARE_RE.match, os.listdir(self.directory))
                      if m)

    def _spare(self, n: int) -> str:
        return os.path.join(self.directory, "spare-%016d.fjs" % n)

    def _allocate(self, fd: int, length: int, what: str) -> None:
        try:
            fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, length)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ReserveError(
                    "group %s: the journal reserve (%d bytes for --journal-max %d) cannot be "
                    "allocated on the file system at %s: %s has no room for %d bytes (%d "
                    "free)" % (self.group, self.size, self.journal_max,
                               mount_of(self.directory), what, length,
                               free_bytes(self.directory))) from None
            raise OSError(e.errno, e.strerror, what) from None

    def fill(self, segments: List[str], strict: bool = True) -> None:
        """Allocate every slot (the segments' own first, then spares) and the room;
        ReserveError when the file system cannot (``strict``: also when it has less free
        than is missing, before anything is allocated; else the room is taken as far as it
        goes). Durable (names) when it returns."""
        if strict:
            check(self.group, self.directory, self.journal_max)
        for path in segments:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                self._allocate(fd, max(self.slot, os.fstat(fd).st_size), path)
            finally:
                os.close(fd)
        for n in self._spares():
            if os.lstat(self._spare(n)).st_nlink > 1:  # a crash inside take(): a segment now
                os.unlink(self._spare(n))
        have = len(segments) + len(self._spares())
        n = max(self._spares(), default=0)
        for _ in range(self.slots - have):
            n += 1
            self._new_spare(n)
        for n in self._spares():
            if os.path.getsize(self._spare(n)):  # a crash between a rename and the recycle
                self._recycle_spare(self._spare(n))
            else:  # made for another limit: a slot of this one
                fd = os.open(self._spare(n), os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    self._allocate(fd, self.slot, self._spare(n))
                finally:
                    os.close(fd)
        self.refill(strict)
        fsync_dir(self.directory)

    def _new_spare(self, n: int) -> None:
        path = self._spare(n)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW,
                     0o600)
        try:
            self._allocate(fd, self.slot, path)
        except BaseException:
            os.close(fd)
            os.unlink(path)
            raise
        os.close(fd)

    def allocate(self, fd: int, path: str) -> None:
        """Allocate a slot to a segment made without a spare; ReserveError if it cannot."""
        self._allocate(fd, self.slot, path)

    def take(self, path: str) -> bool:
        """Make ``path`` (a new segment) from a spare; False when none is left."""
        spares = self._spares()
        if not spares:
            return False
        src = self._spare(spares[0])
        os.link(src, path)  # never replaces a name (EEXIST)
        os.unlink(src)
        return True

    def recycle(self, path: str) -> None:
        """``path`` (a segment the journal is done with) becomes a spare again, its blocks
        kept (the window in the module's docstring aside)."""
        n = max(self._spares(), default=0) + 1
        spare = self._spare(n)
        os.rename(path, spare)
        try:
            self._recycle_spare(spare)
        except ReserveError as e:  # another writer took the blocks: fill() tries again
            log.warning("%s", e)

    def _recycle_spare(self, spare: str) -> None:
        fd = os.open(spare, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        try:
            os.ftruncate(fd, 0)
            # ext4 reuses freed blocks only once their freeing is committed: commit it.
            os.fsync(fd)
            self._allocate(fd, self.slot, spare)
        finally:
            os.close(fd)

    def room_for(self, write: Callable[[], None], need: int) -> None:
        """Run ``write`` (a small file replaced whole); when the file system is full, give
        ``need`` bytes of the room back and run it again."""
        try:
            write()
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            self.give_back(need)
            write()

    def give_back(self, need: int) -> None:
        """Free ``need`` bytes of the room (all it has, if less)."""
        path = os.path.join(self.directory, ROOM_NAME)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
        except FileNotFoundError:
            return
        try:
            held = os.fstat(fd).st_blocks * 512
            os.ftruncate(fd, 0)
            os.fsync(fd)  # freed blocks are free once committed (ext4)
            if held > need:
                fallocate(fd, FALLOC_FL_KEEP_SIZE, 0, held - need)
        except OSError:
            pass  # what is free now is free
        finally:
            os.close(fd)

    def refill(self, strict: bool = False) -> None:
        """Take the room back (after segments were recycled); ReserveError only with
        ``strict``, else as much as the file system gives."""
        path = os.path.join(self.directory, ROOM_NAME)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        try:
            self._allocate(fd, ROOM, path)
        except ReserveError:
            if strict:
                raise
        finally:
            os.close(fd)

    def usage(self, journal_bytes: int) -> Dict[str, Any]:
        return {"bytes": self.size, "used": journal_bytes, "allocated": allocated(self.directory),
                "slot": self.slot, "slots": self.slots}

