"""Site B's half of pre-seeded sync (``agent/seed.py`` says how it works): a disk's seed.

On site B a disk's seed is two files in ``<group>/seeds/``: ``<disk>.digests`` (written
once at adoption) and ``<disk>.touched`` (replaced when it changed, at each replica
checkpoint). A crash loses at most touches of records still in the journal past the
replicas' point, and opening the group touches those again. A seed file that does not
read back is dropped: that costs a full sync, never a wrong replica.

``adopt`` copies the admin's seed file into a new replica (a reflink where the file system
can, else in the kernel, holes kept) and hashes what the replica then holds; ``SeedMap``
follows which chunks the stream has touched since.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
import time
from typing import Dict, Iterator, List, Optional, Tuple

import xxhash

from formats.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from formats.durable import ReplaceFile, pwrite_all, write_atomic
from formats.records import KIND_CONSISTENT

from ..disks import Policy, check_kind
from ..errors import RequestError
from ..seed import (
    CHUNK,
    DIGEST,
    MAX_CHUNK,
    TOUCHING,
    SeedError,
    aligned,
    chunks,
    range_digest,
    span,
)

__all__ = ["CHUNK", "GroupSeeds", "SeedError", "SeedMap", "adopt", "adopt_group",
           "check_file", "drop", "load", "save_digests", "save_touched", "seed_paths"]

log = logging.getLogger("ferry.target")

FRAME_CHUNKS = 65536       # digests per SEED frame (1 MiB of them)

# <group>/seeds/<disk>.digests: header, the digests, xxh3_64 of both.
HEADER = struct.Struct("<4sIQQ")  # magic, chunk, disk size, chunks
assert HEADER.size == 24
MAGIC = b"FSD\x01"
COPY_BLOCK = 8 * CHUNK
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)


class SeedMap:
    """Site B's digests of one disk's seed, and which chunks the stream has touched since."""

    def __init__(self, size: int, digests: bytes, chunk: int = CHUNK,
                 touched: Optional[bytearray] = None) -> None:
        n = chunks(size, chunk)
        if len(digests) != n * DIGEST:
            raise ValueError("%d bytes of digests for %d chunks" % (len(digests), n))
        self.size = size
        self.chunk = chunk
        self.digests = bytes(digests)
        self.touched = touched if touched is not None else bytearray(n)  # 1: touched
        if len(self.touched) != n:
            raise ValueError("touched map of %d chunks for %d" % (len(self.touched), n))
        self.changed = False  # touched since the map was last saved

    def copy(self) -> SeedMap:
        return SeedMap(self.size, self.digests, self.chunk, bytearray(self.touched))

    def touch(self, kind: int, offset: int, length: int) -> None:
        """A journaled record: a change to the replica's bytes ends their seed."""
        if kind in TOUCHING and length:
            first, end = span(offset, length, self.chunk)
            if self.touched.find(0, first, end) >= 0:
                self.touched[first:end] = b"\x01" * (end - first)
                self.changed = True

    def check(self, offset: int, length: int, digest: Optional[bytes]) -> Optional[str]:
        """Why a SEEDED record for this range is wrong, or None when it is right."""
        if not aligned(offset, length, self.size, self.chunk):
            return "SEEDED record [%d, +%d) is not whole %d-byte chunks" % (
                offset, length, self.chunk)
        first, end = span(offset, length, self.chunk)
        if self.touched.find(1, first, end) >= 0:
            return "SEEDED record [%d, +%d) for a chunk changed since the seed" % (
                offset, length)
        if digest != range_digest(self.digests[first * DIGEST:end * DIGEST]):
            return "SEEDED record [%d, +%d) does not match the seed" % (offset, length)
        return None

    def untouched(self) -> int:
        return len(self.touched) - self.touched.count(1)

    def frames(self) -> Iterator[Tuple[int, bytes, bytes]]:
        """(first chunk, digests, touched map) for each SEED frame."""
        for first in range(0, len(self.touched), FRAME_CHUNKS):
            end = min(first + FRAME_CHUNKS, len(self.touched))
            yield first, self.digests[first * DIGEST:end * DIGEST], bytes(self.touched[first:end])


class GroupSeeds(List[Optional[SeedMap]]):
    """The seeds of a group's disks (None: no seed), in group order. A disk's seed lasts
    until its initial sync ends: a disk whole once has none, and its files are dropped."""

    def __init__(self, directory: str, disks: List[Tuple[str, int]],
                 whole: List[bool]) -> None:
        super().__init__(None if w else load(directory, name, size)
                         for (name, size), w in zip(disks, whole))
        self.directory = directory
        self.names = [name for name, _size in disks]
        for name, m in zip(self.names, self):
            if m is None:
                drop(directory, name)

    def note(self, disk: int, kind: int, offset: int, length: int) -> None:
        """A journaled record of ``disk``: it touches the seed, or ends it (consistent)."""
        m = self[disk]
        if m is None:
            return
        if kind == KIND_CONSISTENT:
            self[disk] = None
            drop(self.directory, self.names[disk])
        else:
            m.touch(kind, offset, length)

    def save(self) -> None:
        """Replace the touched maps that changed (durable when it returns)."""
        for name, m in zip(self.names, self):
            if m is not None and m.changed:
                save_touched(self.directory, name, m)

    def frames(self) -> List[Tuple[int, int, int, bytes, bytes]]:
        """Every SEED frame: (disk, chunk, first chunk, digests, touched map)."""
        return [(i, m.chunk, first, digests, touched) for i, m in enumerate(self)
                if m is not None for first, digests, touched in m.frames()]


def seed_paths(directory: str, disk: str) -> Tuple[str, str]:
    base = os.path.join(directory, "seeds", disk)
    return base + ".digests", base + ".touched"


def save_digests(directory: str, disk: str, m: SeedMap) -> None:
    """Write the seed's digests and an empty touched map; durable when it returns."""
    os.makedirs(os.path.join(directory, "seeds"), exist_ok=True)
    dpath, _tpath = seed_paths(directory, disk)
    body = HEADER.pack(MAGIC, m.chunk, m.size, len(m.touched)) + m.digests
    write_atomic(dpath, body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
    save_touched(directory, disk, m)


def save_touched(directory: str, disk: str, m: SeedMap) -> None:
    """Replace the touched map (atomic, durable when it returns)."""
    _dpath, tpath = seed_paths(directory, disk)
    body = bytes(m.touched)
    write_atomic(tpath, body + struct.pack("<Q", xxhash.xxh3_64_intdigest(body)))
    m.changed = False


def load(directory: str, disk: str, size: int) -> Optional[SeedMap]:
    """The disk's seed, or None when there is none or it does not read back whole."""
    dpath, tpath = seed_paths(directory, disk)
    try:
        with open(dpath, "rb") as f:
            raw = f.read()
        with open(tpath, "rb") as f:
            touched = f.read()
    except FileNotFoundError:
        return None
    for buf in (raw, touched):
        if len(buf) < 8 or struct.unpack("<Q", buf[-8:])[0] != xxhash.xxh3_64_intdigest(
                buf[:-8]):
            return None
    if len(raw) < HEADER.size + 8:
        return None
    magic, chunk, dsize, n = HEADER.unpack_from(raw)
    if magic != MAGIC or dsize != size or not 0 < chunk <= MAX_CHUNK or n != chunks(size, chunk):
        return None
    try:
        return SeedMap(size, raw[HEADER.size:-8], chunk, bytearray(touched[:-8]))
    except ValueError:
        return None


def drop(directory: str, disk: str) -> None:
    for path in seed_paths(directory, disk):
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


def check_file(path: str, size: int, policy: Optional[Policy] = None) -> None:
    """Refuse a seed file the admin named that cannot be adopted (SeedError). With the
    site's ``policy``, a seed obeys the image roots as a disk does, and a path outside
    them is refused before anything about it (existence, kind, size) is looked at."""
    if not os.path.isabs(path):
        raise SeedError("seed %s is not an absolute path" % path)
    what = "seed %s" % path
    try:
        if policy is not None:
            policy.check_name(what, path)
        check_kind(what, os.stat(path))
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    except RequestError as e:
        raise SeedError(str(e)) from None
    except OSError as e:
        raise SeedError("seed %s: %s" % (path, e.strerror or e)) from None
    try:
        if policy is not None:
            try:
                policy.check_open(what, fd)
            except RequestError as e:
                raise SeedError(str(e)) from None
        have = os.lseek(fd, 0, os.SEEK_END)
        if have != size:
            raise SeedError("seed %s is %d bytes; the disk is %d bytes" % (path, have, size))
    finally:
        os.close(fd)


def adopt(src: str, dest: str, size: int, chunk: int = CHUNK,
          policy: Optional[Policy] = None) -> SeedMap:
    """Copy the seed ``src`` into the new replica ``dest`` and return its digests.

    Where the file system can (XFS, btrfs), ``dest`` is a reflink of ``src``: nothing is
    copied. Otherwise the seed's data is copied in the kernel (``copy_file_range``, or
    read and write where that cannot cross file systems), holes skipped. Then ``dest`` is
    read back and hashed: the digests are of what the replica holds, and its all-zero
    chunks are made holes. ``src`` is opened read-only and never changed. ``dest`` is
    written under a temporary name and renamed when whole: the data and the name are
    durable when this returns. ``policy``: as for ``check_file``."""
    check_file(src, size, policy)
    sfd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with ReplaceFile(dest, 0o600) as out:
            dfd = out.fd
            if not _clone(sfd, dfd):
                os.ftruncate(dfd, size)
                for start, end, data in _extents(sfd, size, chunk):
                    if data:
                        _copy(sfd, dfd, start, end, src)
            digests = _hash(dfd, size, chunk, src)
            out.commit()
    finally:
        os.close(sfd)
    return SeedMap(size, digests, chunk)


def _clone(sfd: int, dfd: int) -> bool:
    """Make ``dfd`` a reflink of ``sfd`` (FICLONE) if the file system can."""
    try:
        fcntl.ioctl(dfd, FICLONE, sfd)
    except OSError as e:
        if e.errno in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EXDEV, errno.EINVAL,
                       errno.EPERM, errno.EISDIR):
            return False  # another file system, a block device, no reflinks here
        raise
    return True


def _copy(sfd: int, dfd: int, start: int, end: int, src: str) -> None:
    """Copy ``[start, end)`` in the kernel; by reads and writes where it cannot."""
    off = start
    try:
        while off < end:
            n = os.copy_file_range(sfd, dfd, end - off, off, off)
            if n == 0:
                raise OSError(errno.EIO, "seed %s ended early at byte %d" % (src, off))
            off += n
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    buf = bytearray(COPY_BLOCK)
    while off < end:
        view = memoryview(buf)[:min(COPY_BLOCK, end - off)]
        n = os.preadv(sfd, [view], off)
        if n == 0:
            raise OSError(errno.EIO, "seed %s ended early at byte %d" % (src, off))
        pwrite_all(dfd, view[:n], off)
        off += n


def _hash(fd: int, size: int, chunk: int, src: str) -> bytes:
    """The digests of the file's chunks; all-zero chunks become holes on the way."""
    zeros = {n: xxhash.xxh3_128_digest(bytes(n)) for n in {chunk, size % chunk or chunk}}
    out = bytearray()
    buf = bytearray(COPY_BLOCK - COPY_BLOCK % chunk or chunk)
    for start, end, data in _extents(fd, size, chunk):
        if not data:
            out += b"".join(zeros[min(chunk, size - off)] for off in range(start, end, chunk))
            continue
        for off in range(start, end, len(buf)):
            view = memoryview(buf)[:min(len(buf), end - off)]
            if os.preadv(fd, [view], off) != len(view):
                raise OSError(errno.EIO, "seed %s: its copy ended early" % src)
            for i in range(0, len(view), chunk):
                piece = view[i:i + chunk]
                digest = xxhash.xxh3_128_digest(piece)
                out += digest
                if digest == zeros[len(piece)]:
                    try:
                        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off + i,
                                  len(piece))
                    except OSError:
                        pass  # it stays allocated: the bytes are right all the same
    return bytes(out)


def _extents(fd: int, size: int, chunk: int) -> Iterator[Tuple[int, int, bool]]:
    """``(start, end, holds data)`` in chunk-aligned pieces covering ``[0, size)``; a
    chunk with any data in it counts as data. Without SEEK_DATA (a block device on some
    kernels): one piece of data."""
    pos = 0
    while pos < size:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                data = size  # only a hole after pos
            elif e.errno == errno.EINVAL:
                yield pos, size, True
                return
            else:
                raise
        start = size if data >= size else data - data % chunk
        if start > pos:
            yield pos, start, False
        if start >= size:
            return
        hole = os.lseek(fd, data, os.SEEK_HOLE)
        hole = min(size, -(-hole // chunk) * chunk)
        yield start, hole, True
        pos = hole


def adopt_group(directory: str, group: str, disks: List[Tuple[str, int]],
                seeds: Dict[str, str], policy: Optional[Policy] = None) -> None:
    """Start a new group's replicas from the admin's seed files (``adopt``); each seed's
    digests are saved once its replica is whole."""
    sizes = dict(disks)
    os.makedirs(os.path.join(directory, "replicas"), exist_ok=True)
    for dname, path in sorted(seeds.items()):
        started = time.monotonic()
        m = adopt(path, os.path.join(directory, "replicas", dname + ".img"), sizes[dname],
                  policy=policy)
        save_digests(directory, dname, m)  # only once its replica is whole
        log.info("group %s: disk %s starts from the seed %s (%d bytes adopted in %.1f s)",
                 group, dname, path, sizes[dname], time.monotonic() - started)
