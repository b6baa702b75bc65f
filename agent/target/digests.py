"""A replica at rest: a digest per 1 MiB chunk, kept by promotion, checked by scrub.

Theory of operation
-------------------
Each replica ``replicas/<disk>.img`` has ``replicas/<disk>.digests``: a 32-byte header
(magic ``FRYDIG01``, chunk size, disk size, reserved) and one little-endian xxh3_64 per
chunk, 0 for "not known". Every change the applier writes onto a replica marks its chunks
(``touched``); where the applier makes the replica durable (after the initial sync's
direct writes, at each replica checkpoint) the marked chunks are read back and their
digests written (``update``). A crash between the two leaves digests that disagree with
the replica for chunks written since: a scrub then asks the source for those chunks again,
which costs a resend, never data. Paths that write replicas otherwise (a commit of a live
failover) ``forget`` the digests: the next scrub makes a new baseline.

``scrub`` reads every chunk (one at a time, the group's lock held only for that chunk, so
batches and promotion go on), and compares: a chunk that differs from its digest is
damaged at rest (media, or a hand that wrote into the file) and is reported; an unknown
one gets its digest (the baseline). The caller asks the source for the damaged ranges
(``repairs.py``). A chunk reported stays out of later reports until the applier writes it
again (the repair's records, once promoted, make it whole and give it a new digest).
"""

from __future__ import annotations

import os
import struct
from typing import Callable, ContextManager, Dict, List, Set, Tuple, Union

import xxhash

from formats import reads
from formats.durable import pwrite_all

from ..errors import StorageError

CHUNK = 1024 * 1024
MAGIC = b"FRYDIG01"
HEADER = struct.Struct("<8sQQQ")
ENTRY = struct.Struct("<Q")


class ChunkDamaged(StorageError):
    """Replica chunks fail their digests where a read needed them (``verify``); ``disk``
    and ``ranges`` are what to ask the source for again."""

    def __init__(self, message: str, path: str, disk: int,
                 ranges: List[Tuple[int, int]]) -> None:
        super().__init__(message, path)
        self.disk, self.ranges = disk, ranges


def digest(data: Union[bytes, memoryview]) -> int:
    return xxhash.xxh3_64_intdigest(data) or 1  # 0 means "not known"


class ReplicaDigests:
    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.size = size
        self.chunks = -(-size // CHUNK)
        self.entries = [0] * self.chunks
        self.dirty: Set[int] = set()
        self.fresh: Dict[int, int] = {}  # written whole since the last update: its digest
        self.reported: Set[int] = set()  # damaged, repair asked, not written since
        self._load()

    def _load(self) -> None:
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            return
        except OSError as e:
            raise StorageError("cannot read %s: %s" % (self.path, e.strerror or e),
                               self.path, e.errno) from None
        if len(raw) < HEADER.size:
            return  # torn at creation: a new baseline
        magic, chunk, size, _ = HEADER.unpack_from(raw)
        if magic != MAGIC or chunk != CHUNK or size != self.size:
            return  # another layout or a resized disk: a new baseline
        n = min(self.chunks, (len(raw) - HEADER.size) // ENTRY.size)
        self.entries[:n] = [e[0] for e in struct.iter_unpack(
            "<Q", raw[HEADER.size:HEADER.size + n * ENTRY.size])]

    def touched(self, offset: int, length: int) -> None:
        if length <= 0:
            return
        first, last = offset // CHUNK, (offset + length - 1) // CHUNK
        for c in range(first, min(last, self.chunks - 1) + 1):
            self.dirty.add(c)
            self.fresh.pop(c, None)
            self.reported.discard(c)

    def written(self, offset: int, data: bytes) -> None:
        """``data`` was written at ``offset``: the chunks it covers whole get their digest
        from it (``update`` need not read them back, which after an O_DIRECT write would
        read the disk); the chunks it covers in part are ``touched``."""
        end = offset + len(data)
        first, last = -(-offset // CHUNK), end // CHUNK
        if end == self.size:
            last = self.chunks  # the last chunk may be short
        if first >= last:
            self.touched(offset, len(data))
            return
        self.touched(offset, first * CHUNK - offset)
        view = memoryview(data)
        for c in range(first, last):
            start, n = self.chunk_range(c)
            self.dirty.discard(c)
            self.reported.discard(c)
            self.fresh[c] = digest(view[start - offset:start - offset + n])
        self.touched(last * CHUNK, end - last * CHUNK)

    def forget(self) -> None:
        """The replica was written by a path that keeps no digests: all unknown."""
        self.entries = [0] * self.chunks
        self.dirty.clear()
        self.fresh.clear()
        self.reported.clear()
        self._write_all()

    def update(self, fd: int) -> None:
        """Digests of the chunks written since the last update, from the replica ``fd``
        (call once it is durable); written to the digests file (durable too)."""
        if not self.dirty and not self.fresh:
            return
        changed = sorted(self.dirty | set(self.fresh))
        for c in self.dirty:
            self.entries[c] = digest(self._read(fd, c))
        for c, d in self.fresh.items():
            self.entries[c] = d
        self.dirty.clear()
        self.fresh.clear()
        self._write(changed)

    def _read(self, fd: int, c: int) -> bytes:
        offset = c * CHUNK
        length = min(CHUNK, self.size - offset)
        data = reads.pread(fd, length, offset)  # an error names the range
        if len(data) < length:  # past a replica's end: zeroes
            data += bytes(length - len(data))
        return data

    def _write(self, changed: List[int]) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW,
                         0o600)
        except OSError as e:
            raise StorageError("cannot write %s: %s" % (self.path, e.strerror or e),
                               self.path, e.errno) from None
        try:
            if os.fstat(fd).st_size < HEADER.size:
                pwrite_all(fd, HEADER.pack(MAGIC, CHUNK, self.size, 0), 0)
            # Runs of neighbouring chunks go out as one write.
            i = 0
            while i < len(changed):
                j = i
                while j + 1 < len(changed) and changed[j + 1] == changed[j] + 1:
                    j += 1
                first = changed[i]
                blob = b"".join(ENTRY.pack(self.entries[c]) for c in changed[i:j + 1])
                pwrite_all(fd, blob, HEADER.size + first * ENTRY.size)
                i = j + 1
            os.fdatasync(fd)
        except OSError as e:
            raise StorageError("cannot write %s: %s" % (self.path, e.strerror or e),
                               self.path, e.errno) from None
        finally:
            os.close(fd)

    def _write_all(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        self._write(list(range(self.chunks)))

    def check(self, fd: int, c: int) -> str:
        """Check chunk ``c`` (call with the group's lock held): ``skip`` (written since the
        last update, or its repair is under way), ``checked``, ``baseline`` (its digest was
        not known: now it is, in memory; ``save`` writes it) or ``damaged`` (reported)."""
        if c in self.dirty or c in self.reported:
            return "skip"
        now = digest(self._read(fd, c))
        known = self.entries[c]
        if not known:
            self.entries[c] = now
            return "baseline"
        if known != now:
            self.reported.add(c)
            return "damaged"
        return "checked"

    def verify(self, fd: int, holes: Set[int], skip: Callable[[int], bool],
               known_only: bool = False) -> List[int]:
        """The chunks of the replica ``fd`` that fail their digest, but for those ``skip``
        says a read will not need and those written since the last update; a chunk in
        ``holes`` (no data there) is checked against the digest of zeroes without reading.
        Chunks found are reported (a scrub leaves them to their repair). ``known_only``:
        only those reported before, nothing read."""
        bad = []
        for c in range(self.chunks):
            known = self.entries[c]
            if c in self.dirty or skip(c) or not (known or c in self.reported):
                continue
            if c in self.reported:
                bad.append(c)  # found before; its repair is not in the replica yet
                continue
            if known_only:
                continue
            if c in holes:
                now = digest(bytes(self.chunk_range(c)[1]))
            else:
                now = digest(self._read(fd, c))
            if now != known:
                self.reported.add(c)
                bad.append(c)
        return bad

    def chunk_range(self, c: int) -> Tuple[int, int]:
        offset = c * CHUNK
        return offset, min(CHUNK, self.size - offset)

    def save(self, chunks: List[int]) -> None:
        if chunks:
            self._write(chunks)

    def scrub(self, fd: int, lock: ContextManager) -> Dict[str, object]:
        """Check every chunk (see the module): ``{"checked", "baseline", "damaged":
        [(offset, length), ...]}``, damaged ranges merged."""
        damaged: List[Tuple[int, int]] = []
        baseline: List[int] = []
        checked = 0
        for c in range(self.chunks):
            with lock:
                found = self.check(fd, c)
            if found == "baseline":
                baseline.append(c)
            elif found == "checked":
                checked += 1
            elif found == "damaged":
                merge(damaged, *self.chunk_range(c))
        self.save(baseline)
        return {"checked": checked, "baseline": len(baseline), "damaged": damaged}


def merge(ranges: List[Tuple[int, int]], offset: int, length: int) -> None:
    """Add ``(offset, length)`` to ``ranges``, joined with the last one when they touch."""
    if ranges and ranges[-1][0] + ranges[-1][1] == offset:
        ranges[-1] = (ranges[-1][0], ranges[-1][1] + length)
    else:
        ranges.append((offset, length))


def digests_path(replica: str) -> str:
    root, _ext = os.path.splitext(replica)
    return root + ".digests"

