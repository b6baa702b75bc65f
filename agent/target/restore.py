"""A disk as of a point in time, written out: restore to a new file, and the overlay that
failover writes onto the replicas.

The state of disk d at a point is its replica plus the journaled records of d after the
replica's point up to the point's cut for d, applied in journal order (``write_overlay``).
``restore`` copies the replica sparsely to a temporary name beside ``dest``, writes the
overlay onto the copy, fdatasyncs it, renames it to ``dest`` and fsyncs the directory: the
file and its name are durable when it returns, and a crash before leaves no ``dest``.
"""

from __future__ import annotations

import errno
import os
from typing import Any, Dict, Iterator, Optional, Tuple

from formats import jindex
from formats.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from formats.durable import fsync_parent, pwrite_all
from formats.records import KIND_CHECKPOINT, KIND_TRIM, KIND_WRITE, KIND_ZERO, Point

from ..errors import Conflict, NotFound
from .journal import Journal, Position
from .state import GroupData


def check_dest(dest: str) -> str:
    """The absolute path of a restore's new file; Conflict if it exists, NotFound if its
    directory does not."""
    dest = os.path.abspath(dest)
    if os.path.exists(dest):
        raise Conflict("%s already exists; restore writes a new file" % dest)
    if not os.path.isdir(os.path.dirname(dest)):
        raise NotFound("directory %s does not exist" % os.path.dirname(dest))
    return dest


def entries_from(journal: Journal, pos: Position) -> Iterator[Tuple[int, Tuple[int, ...]]]:
    """(segment, index entry) of every record from ``pos`` on, in journal order."""
    for segno in journal.segments():
        if segno < pos[0]:
            continue
        for e in jindex.entries(journal.index(segno)):
            if segno == pos[0] and e[8] < pos[1]:
                continue
            yield segno, e


def overlay(g: GroupData, index: int, upto: Point) -> Iterator[Tuple[int, Tuple[int, ...]]]:
    """The journal records of disk ``index`` between the replica and ``upto``."""
    st = g.disks[index]
    base = (st.applied_gen, st.applied_seq)
    for segno, e in entries_from(g.journal, g.applied):
        if e[0] == index and e[1] < KIND_CHECKPOINT and base < (e[3], e[5]) <= upto:
            yield segno, e


def write_overlay(g: GroupData, fd: int, index: int, upto: Point) -> None:
    """Apply to ``fd`` the records of disk ``index`` up to ``upto`` (journal order);
    durability is the caller's fdatasync."""
    for segno, e in overlay(g, index, upto):
        kind, offset, length = e[1], e[6], e[4]
        if kind == KIND_WRITE:
            rec = g.journal.read_at(segno, e[8])
            assert rec.data is not None
            pwrite_all(fd, rec.data, offset)
        elif kind in (KIND_ZERO, KIND_TRIM):
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)


def restore(g: GroupData, disk: str, dest: str, ref: Optional[str],
            at_wall_ns: Optional[int]) -> Dict[str, Any]:
    """Write ``disk`` as of a checkpoint (default: its newest consistent state) to the new
    file ``dest`` (see the module). Call with the group's lock held."""
    index = g.index_of(disk)
    st = g.disks[index]
    c, cut, held = g.point(ref, at_wall_ns)
    tmp = dest + ".ferry-partial"
    sparse_copy(g.replica_path(disk), tmp, st.size)
    fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
    try:
        write_overlay(g, fd, index, cut[index])  # each record checked: JournalCorrupt
        os.fdatasync(fd)
    except BaseException:
        os.unlink(tmp)  # never a partial file left behind
        raise
    finally:
        os.close(fd)
    os.rename(tmp, dest)
    fsync_parent(dest)
    return {"group": g.name, "disk": disk, "to": dest, "size": st.size,
            "gen": cut[index][0], "seq": cut[index][1], "resyncing": held,
            "checkpoint": c.to_json() if c else None}


def sparse_copy(src: str, dest: str, size: int) -> None:
    """Copy ``src`` to the new file ``dest`` keeping holes; durable when it returns."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        dfd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            os.ftruncate(dfd, size)
            pos = 0
            while pos < size:
                try:
                    data = os.lseek(sfd, pos, os.SEEK_DATA)
                except OSError as e:
                    if e.errno == errno.ENXIO:
                        break  # only a hole after pos
                    raise
                hole = min(os.lseek(sfd, data, os.SEEK_HOLE), size)
                off = data
                while off < hole:
                    n = os.copy_file_range(sfd, dfd, hole - off, off, off)
                    if n == 0:
                        raise OSError(errno.EIO, "%s ended early at byte %d" % (src, off))
                    off += n
                pos = hole
            os.fdatasync(dfd)
        finally:
            os.close(dfd)
    finally:
        os.close(sfd)
    fsync_parent(dest)
