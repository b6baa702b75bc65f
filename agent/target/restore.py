"""A disk as of a point in time, written out: restore to a new file, and the overlay that
failover writes onto the replicas.

The state of disk d at a point is its replica plus the journaled records of d after the
replica's point up to the point's cut for d, applied in journal order (``write_overlay``).

``restore`` writes a new file only, and never through a name: ``check_dest`` refuses a
destination that exists in any form (a file, a symlink even dangling, a hard link to
anything, a FIFO), one that is a protected disk, or one in the agent's data directory; the
file is then made unnamed in the destination's directory (``formats.durable.NewFile``:
``O_TMPFILE``, or a random name ``O_EXCL|O_NOFOLLOW``), filled, fdatasynced and linked to
its name, which refuses a name planted meanwhile; the directory is fsynced. The file and
its name are durable when it returns; a failure or a crash before leaves nothing behind.
The replica is copied sparsely (``SEEK_DATA``/``SEEK_HOLE``), in the kernel where it can
(``copy_file_range``) and by reads and writes where it refuses (another file system:
``EXDEV``; ``EINVAL``, ``EOPNOTSUPP``, ``ENOSYS``), so any file system is a destination.

``restore_as`` writes a qcow2 or VMDK image instead: ``qemu-img convert`` reads a
point-in-time view's NBD export and writes into the same kind of unnamed new file, opened
as ``/proc/self/fd/N``; the same guarantees hold.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import subprocess
import tempfile
from typing import Any, Dict, Iterator, List, Optional, Tuple

from formats import images, jindex, reads
from formats.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from formats.durable import NewFile, pwrite_all
from formats.records import (
    KIND_CHECKPOINT,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
    MAP_KINDS,
    Point,
)

from ..disks import Policy, fd_path
from ..errors import Conflict, FerryError, Invalid, NotFound, StorageError, Unavailable
from .digests import CHUNK, ChunkDamaged, merge
from .journal import Journal, Position
from .state import GroupData

COPY_BLOCK = 1 << 20
NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOSYS)
_copied: Dict[str, int] = {}  # destination -> bytes of the replica copied so far


def real_dest(dest: str) -> str:
    """``dest`` with its directory's real path (the name itself is not resolved)."""
    dest = os.path.abspath(dest)
    return os.path.join(os.path.realpath(os.path.dirname(dest)), os.path.basename(dest))


def copied(dest: str) -> Optional[int]:
    """Bytes of the replica copied so far by a restore to ``dest`` running now, else None."""
    return _copied.get(real_dest(dest))


def check_dest(dest: str, policy: Optional[Policy] = None) -> str:
    """The path of a restore's new file, its directory resolved; NotFound if the directory
    does not exist, Conflict if the name exists in any form (or is a protected disk),
    Invalid if it lies in the agent's data directory (see the module)."""
    name = os.path.basename(os.path.abspath(dest))
    if dest.endswith("/") or name in ("", ".", ".."):
        raise Invalid("restore destination %s is not a file name" % dest)
    directory = os.path.dirname(os.path.abspath(dest))
    if not os.path.isdir(directory):
        raise NotFound("directory %s does not exist" % directory)
    real = real_dest(dest)
    if policy is not None and policy.in_data(real):
        raise Invalid("restore destination %s lies in the agent's data directory %s"
                      % (dest, policy.data_dir))
    if os.path.lexists(real):
        holder = policy.claimed_path(real) if policy is not None else None
        if holder is not None:
            raise Conflict("%s is disk %s of protected group %s; restore writes a new file"
                           % (dest, holder[1], holder[0]))
        raise Conflict("%s already exists; restore writes a new file" % dest)
    return real


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
    # Repaired damage: records after it cover it for every point ``point`` lets through.
    passed = [(d.segment, d.offset, max(d.end, d.offset + 1)) for d in g.journal.damage
              if d.repaired_at is not None]
    for segno, e in entries_from(g.journal, g.applied):
        if e[0] == index and e[1] < KIND_CHECKPOINT and base < (e[3], e[5]) <= upto:
            if any(s == segno and a <= e[8] < b for s, a, b in passed):
                continue
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


def check_replica(g: GroupData, index: int, upto: Point, known_only: bool = False) -> None:
    """ChunkDamaged if a replica chunk that the state up to ``upto`` reads (one the
    journal's records do not cover whole) fails its digest (``digests.verify``);
    ``known_only``: only chunks found damaged before (a view: nothing read now)."""
    digests = g.digests[index]
    if known_only and not digests.reported:
        return  # nothing known damaged: a view opens without reading the journal's index
    covered: List[Tuple[int, int]] = sorted(
        (e[6], e[6] + e[4]) for _s, e in overlay(g, index, upto) if e[1] in MAP_KINDS)

    def whole(c: int) -> bool:  # is chunk c covered by the records?
        start, length = digests.chunk_range(c)
        pos, end = start, start + length
        for a, b in covered:
            if a > pos:
                if a >= end:
                    break
                return False
            pos = max(pos, b)
            if pos >= end:
                return True
        return pos >= end

    fd = g.fds[index]
    holes = set(range(digests.chunks))
    for start, end in data_extents(fd, g.disks[index].size):
        holes -= set(range(start // CHUNK, -(-end // CHUNK)))
    try:
        bad = digests.verify(fd, holes, whole, known_only)
    except OSError as e:  # the range is in the error (digests._read): name the file
        raise reads.named(e, g.replica_path(g.disks[index].name)) from None
    if bad:
        ranges: List[Tuple[int, int]] = []
        for c in bad:
            merge(ranges, *digests.chunk_range(c))
        path = g.replica_path(g.disks[index].name)
        raise ChunkDamaged("group %s, disk %s: replica %s: %d chunk(s) fail their digest "
                           "(bytes %s); asked the source for them again" % (
                               g.name, g.disks[index].name, path, len(bad),
                               ", ".join("%d+%d" % r for r in ranges[:4])),
                           path, index, ranges)


def restore(g: GroupData, disk: str, dest: str, ref: Optional[str],
            at_wall_ns: Optional[int]) -> Dict[str, Any]:
    """Write ``disk`` as of a checkpoint (default: its newest consistent state) to the new
    file ``dest`` (from ``check_dest``; see the module). Call with the group's lock held."""
    index = g.index_of(disk)
    st = g.disks[index]
    c, cut, held = g.point(ref, at_wall_ns)
    what = "restore of group %s disk %s to %s" % (g.name, disk, dest)
    with destination(dest, what) as out:
        check_replica(g, index, cut[index])
        size = st.size_at(cut[index])  # a point before a growth: the size it had then
        sparse_copy(g.replica_path(disk), out.fd, size, dest)
        write_overlay(g, out.fd, index, cut[index])  # each record checked
        out.commit()
    return {"group": g.name, "disk": disk, "to": dest, "size": size,
            "gen": cut[index][0], "seq": cut[index][1], "resyncing": held,
            "checkpoint": c.to_json() if c else None}


@contextlib.contextmanager
def destination(dest: str, what: str) -> Iterator[NewFile]:
    """A restore's new file at ``dest`` (the caller commits it): made in the directory it
    was checked in, never through a link; any failure is one line and leaves nothing."""
    _copied[dest] = 0
    try:
        with NewFile(dest, 0o644) as out:
            if fd_path(out.dir_fd) != os.path.dirname(dest):
                raise Conflict("%s: its directory was replaced while the restore began"
                               % what)
            yield out
    except FileExistsError:
        raise Conflict("%s already exists; restore writes a new file" % dest) from None
    except FerryError:
        raise
    except OSError as e:
        raise dest_error(what, e) from None
    finally:
        _copied.pop(dest, None)


def dest_error(what: str, e: OSError) -> FerryError:
    """A restore's failure in one line, classed by its errno."""
    cause = e.strerror or str(e)
    if e.filename:
        cause = "%s: %s" % (e.filename, cause)
    if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return Unavailable("%s failed: %s; nothing was left behind" % (what, cause))
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR, errno.ELOOP,
                   errno.ENAMETOOLONG):
        return Invalid("%s failed: %s" % (what, cause))
    return StorageError("%s failed: %s; nothing was left behind" % (what, cause),
                        e.filename, e.errno)


def sparse_copy(src: str, dfd: int, size: int, dest: str = "") -> None:
    """Copy ``src`` onto the empty file ``dfd``, keeping holes; durability is the caller's
    fdatasync. Counts its progress under ``dest`` (``copied``)."""
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.ftruncate(dfd, size)
        kernel = True
        for start, end in data_extents(sfd, size):
            off = start
            while off < end:
                if kernel:
                    try:
                        n = os.copy_file_range(sfd, dfd, end - off, off, off)
                    except OSError as e:
                        if e.errno not in NO_KERNEL_COPY:
                            # Which side failed? The same range by hand says (its read
                            # error names the replica and the byte).
                            n = _copy_by_hand(sfd, dfd, off, min(end, off + COPY_BLOCK), src)
                        else:
                            kernel = False  # another file system: reads and writes now
                            continue
                else:
                    n = _copy_by_hand(sfd, dfd, off, min(end, off + COPY_BLOCK), src)
                if n == 0:
                    raise OSError(errno.EIO, "the replica ended early at byte %d" % off, src)
                off += n
                if dest:
                    _copied[dest] = _copied.get(dest, 0) + n
    finally:
        os.close(sfd)


def _copy_by_hand(sfd: int, dfd: int, start: int, end: int, src: str) -> int:
    data = reads.pread(sfd, end - start, start, src)
    pwrite_all(dfd, data, start)
    return len(data)


def data_extents(fd: int, size: int) -> Iterator[Tuple[int, int]]:
    """``[start, end)`` of each stretch of ``fd`` that holds data, below ``size``."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return  # only a hole after pos
            raise
        if data >= size:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), size)
        yield data, hole
        pos = hole


def restore_as(source_uri: str, dest: str, what: str, fmt: str, subformat: Optional[str],
               compress: bool, total: int) -> None:
    """Write the disk served at ``source_uri`` (a point-in-time view) to the new file
    ``dest`` (from ``check_dest``) as an image of format ``fmt``, by ``qemu-img convert`` in
    one pass (sparse where the view reads zeroes), with the guarantees of ``restore``: the
    image is written into the unnamed file of ``NewFile`` (qemu-img opens it as
    ``/proc/self/fd/N``), linked to its name once complete; a failure leaves nothing.
    Progress counts ``total`` bytes (``copied``) as qemu-img reports it."""
    try:
        cmd_probe = images.convert_command(source_uri, "/dev/null", fmt, subformat, compress)
    except images.Unsupported as e:
        raise Invalid(str(e)) from None
    with destination(dest, what) as out:
        cmd = [*cmd_probe[:-1], "/proc/self/fd/%d" % out.fd]
        _convert(cmd, out.fd, dest, total, what)
        out.commit()


_PERCENT = re.compile(rb"\((\d+(?:\.\d+)?)/100%\)")


def _convert(cmd: List[str], fd: int, dest: str, total: int, what: str) -> None:
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=err, pass_fds=(fd,))
        stdout = proc.stdout
        assert stdout is not None
        with stdout:
            for chunk in iter(lambda: os.read(stdout.fileno(), 4096), b""):
                found = _PERCENT.findall(chunk)
                if found:
                    _copied[dest] = int(float(found[-1]) / 100 * total)
        if proc.wait() != 0:
            err.seek(0)
            lines = err.read().decode(errors="replace").strip().splitlines() or ["(no message)"]
            raise StorageError("%s failed: qemu-img convert: %s; nothing was left behind"
                               % (what, lines[-1]), dest, errno.EIO)
