"""A group's journal on the target site: append-only segment files of change records.

Segment files are named ``seg-<number>.fjr`` (the number is 16 decimal digits) and hold
records back to back, each a 48-byte header (``formats/segment.py``) and, for the kinds that
carry data, its data.

``append`` writes a whole batch and fdatasyncs the segment (and
the directory when it made a new segment) before it returns: what it returned from survives
a crash. A segment is closed at ``segment_max`` bytes, or once its first record is
``segment_age`` seconds old, and never written again; when it is closed its index
(``formats/jindex.py``: the entries, and the pieces sorted by block for the views) is
written to ``seg-<number>.idx`` beside it.

Besides the change records of the splitter protocol, two journal-only kinds carry a JSON
object as their data: ``KIND_CHECKPOINT`` (a group checkpoint) and ``KIND_FAILOVER``; and
``KIND_SEEDED`` (a resync of a pre-seeded disk found the range as the seed has it,
``agent/target/seeds.py``) is a stream record without data that changes nothing. ``KIND_APPLIED``
is a change (write, zero or trim) of ``[offset, +length)`` that went straight to the
replica, made durable there before the record was appended, during its disk's initial sync
(``agent/target/applier.py``); it carries no data, and the applier only steps over it.

Opening a journal scans its last segment and cuts off a torn tail: the first record whose
header or checksum does not hold, and all after it, were never acked and are dropped. A
closed segment whose index file is missing or does not hold is read whole (checksums
checked) and its index written again; a version 1 index file (no pieces) is rewritten as
version 2.
"""

from __future__ import annotations

import os
import re
import struct
import time
from typing import Dict, Iterator, List, Optional, Tuple

import xxhash

from formats import jindex
from formats.durable import fsync_dir as _fsync_dir
from formats.durable import write_all as _write_all
from formats.durable import write_atomic
from formats.records import (
    DATA_KINDS,
    JOURNAL_KINDS,
    KIND_APPLIED,
    KIND_SEEDED,
    JRecord,
)
from formats.segment import CHECKED as _CHECKED
from formats.segment import MAGIC, RECORD

from ..errors import StorageError

__all__ = ["KIND_APPLIED", "KIND_SEEDED", "JRecord", "Journal", "JournalCorrupt", "Position"]

SEGMENT_MAX = 64 * 1024 * 1024
_SEGMENT_RE = re.compile(r"^seg-(\d{16})\.fjr$")

Position = Tuple[int, int]  # (segment number, byte offset in it)


class JournalCorrupt(StorageError):
    """A record inside the journal (not at its tail) fails its checks."""


def encode_header(r: JRecord) -> bytes:
    """The record's 48-byte header (formats/segment.py), its checksum over the data too."""
    head = RECORD.pack(MAGIC, r.kind, r.flags, r.disk, r.gen, r.length, r.seq, r.offset,
                       r.time_ns, 0)
    h = xxhash.xxh3_64(head[:_CHECKED])
    if r.data is not None:
        h.update(r.data)
    return head[:_CHECKED] + struct.pack("<Q", h.intdigest())


def _decode_at(buf: memoryview, pos: int) -> Optional[Tuple[JRecord, int]]:
    """The record at ``pos`` and the position after it, or None where it does not hold."""
    if pos + RECORD.size > len(buf):
        return None
    magic, kind, flags, disk, gen, length, seq, offset, time_ns, checksum = \
        RECORD.unpack_from(buf, pos)
    if magic != MAGIC or kind not in JOURNAL_KINDS:
        return None
    end = pos + RECORD.size + (length if kind in DATA_KINDS else 0)
    if end > len(buf):
        return None
    h = xxhash.xxh3_64(buf[pos:pos + _CHECKED])
    data = None
    if kind in DATA_KINDS:
        data = bytes(buf[pos + RECORD.size:end])
        h.update(data)
    if h.intdigest() != checksum:
        return None
    return JRecord(disk, gen, seq, kind, flags, offset, length, time_ns, data), end


class Journal:
    def __init__(self, directory: str, segment_max: int = SEGMENT_MAX,
                 segment_age: Optional[float] = None) -> None:
        self.directory = directory
        self.segment_max = segment_max
        self.segment_age = segment_age
        os.makedirs(directory, exist_ok=True)
        self.dropped_tail = 0  # bytes cut off at open
        self.rebuilt_indexes = 0  # closed segments whose index file was written again
        self.migrated_indexes = 0  # version 1 index files rewritten as version 2
        self._fd = -1
        self._index: Dict[int, bytearray] = {}
        self._first_at: Optional[float] = None  # monotonic time of the open segment's first append
        self._segments = self._list()
        if not self._segments:
            self._segments = [1]
            self._open_segment(1, create=True)
        else:
            for s in self._segments[:-1]:
                self._load_index(s)
            self._recover_tail()

    def path(self, segno: int) -> str:
        return os.path.join(self.directory, "seg-%016d.fjr" % segno)

    _path = path

    def _list(self) -> List[int]:
        out = []
        for name in os.listdir(self.directory):
            m = _SEGMENT_RE.match(name)
            if m:
                out.append(int(m.group(1)))
        return sorted(out)

    def _open_segment(self, segno: int, create: bool) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self._fd = os.open(self._path(segno), flags, 0o600)
        if create:
            _fsync_dir(self.directory)
            self._index[segno] = bytearray()
        self._size = os.fstat(self._fd).st_size

    def _scan(self, segno: int) -> Tuple[bytearray, int, int]:
        """Index entries of the records that hold, where they end, and the file's size."""
        with open(self._path(segno), "rb") as f:
            buf = memoryview(f.read())
        entries = bytearray()
        pos = 0
        while pos < len(buf):
            decoded = _decode_at(buf, pos)
            if decoded is None:
                break
            r, after = decoded
            entries += jindex.ENTRY.pack(r.disk, r.kind, r.flags, r.gen, r.length, r.seq,
                                         r.offset, r.time_ns, pos)
            pos = after
        return entries, pos, len(buf)

    def _load_index(self, segno: int) -> None:
        path = self._path(segno)
        size = os.path.getsize(path)
        try:
            with open(jindex.idx_path(path), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raw = b""
        entries = jindex.unpack_idx(raw, size)
        if entries is not None and not jindex.idx_current(raw):
            # An index from before the pieces were sorted by block (or sorted by blocks of
            # another size): sort them now, so views of this segment open without it.
            self._write_index(segno, entries, size)
            self.migrated_indexes += 1
        if entries is None:
            built, pos, size = self._scan(segno)
            if pos != size:
                raise JournalCorrupt("%s: bad record at byte %d" % (path, pos))
            self._write_index(segno, bytes(built), size)
            self.rebuilt_indexes += 1
            entries = bytes(built)
        self._index[segno] = bytearray(entries)

    def _write_index(self, segno: int, entries: bytes, covers: int) -> None:
        """Replace the segment's index file; durable (file and name) when it returns."""
        write_atomic(jindex.idx_path(self._path(segno)), jindex.pack_idx(entries, covers))

    def _recover_tail(self) -> None:
        last = self._segments[-1]
        path = self._path(last)
        entries, pos, size = self._scan(last)
        if pos < size:
            self.dropped_tail = size - pos
            os.truncate(path, pos)
        self._open_segment(last, create=False)
        self._index[last] = entries
        if entries:
            self._first_at = time.monotonic()
        if self.dropped_tail:
            os.fdatasync(self._fd)

    @property
    def end(self) -> Position:
        return self._segments[-1], self._size

    @property
    def start(self) -> Position:
        return self._segments[0], 0

    def _due_to_close(self) -> bool:
        if self._size >= self.segment_max:
            return True
        return (self.segment_age is not None and self._first_at is not None
                and time.monotonic() - self._first_at >= self.segment_age)

    def rotate(self) -> None:
        """Close the segment being written (if it holds anything) and start a new one."""
        if self._size == 0:
            return
        old = self._segments[-1]
        self._write_index(old, bytes(self._index[old]), self._size)
        segno = old + 1
        self._open_segment(segno, create=True)
        self._segments.append(segno)
        self._first_at = None

    def append(self, records: List[JRecord]) -> Position:
        """Write ``records`` and make them durable; return the journal's new end."""
        if not records:
            return self.end
        if self._due_to_close():
            self.rotate()
        parts: List[bytes] = []
        entries = bytearray()
        pos = self._size
        for r in records:
            parts.append(encode_header(r))
            entries += jindex.ENTRY.pack(r.disk, r.kind, r.flags, r.gen, r.length, r.seq,
                                         r.offset, r.time_ns, pos)
            pos += RECORD.size
            if r.kind in DATA_KINDS:
                assert r.data is not None
                parts.append(r.data)
                pos += len(r.data)
        try:
            written = _write_all(self._fd, parts)
            os.fdatasync(self._fd)
        except OSError:
            # Leave no partial batch behind a later append: cut the segment back.
            os.ftruncate(self._fd, self._size)
            raise
        self._size += written
        self._index[self._segments[-1]] += entries
        if self._first_at is None:
            self._first_at = time.monotonic()
        return self.end

    def index(self, segno: int) -> bytes:
        """The index entries of a segment (``jindex.ENTRY``), in record order."""
        return bytes(self._index[segno])

    def read_at(self, segno: int, pos: int) -> JRecord:
        """The record whose header is at ``pos`` of segment ``segno``, checked."""
        with open(self._path(segno), "rb") as f:
            f.seek(pos)
            head = f.read(RECORD.size)
            if len(head) == RECORD.size:
                kind, length = head[4], struct.unpack_from("<I", head, 12)[0]
                head += f.read(length if kind in DATA_KINDS else 0)
        decoded = _decode_at(memoryview(head), 0)
        if decoded is None:
            raise JournalCorrupt("%s: bad record at byte %d" % (self._path(segno), pos))
        return decoded[0]

    def read_from(self, pos: Position, stop: Optional[Position] = None
                  ) -> Iterator[Tuple[JRecord, Position]]:
        """Records from ``pos`` (to ``stop`` or the end), each with the position after it."""
        segno, offset = pos
        end = stop if stop is not None else self.end
        for s in list(self._segments):
            if s < segno or s > end[0]:
                continue
            start = offset if s == segno else 0
            with open(self._path(s), "rb") as f:
                f.seek(start)
                limit = end[1] if s == end[0] else None
                buf = memoryview(f.read() if limit is None else f.read(max(0, limit - start)))
            p = 0
            while p < len(buf):
                decoded = _decode_at(buf, p)
                if decoded is None:
                    raise JournalCorrupt("%s: bad record at byte %d" % (self._path(s), start + p))
                record, p = decoded
                yield record, (s, start + p)

    def drop_before(self, segno: int) -> None:
        """Delete whole segments older than ``segno`` (never the one being written), and
        their index files."""
        keep = []
        for s in self._segments:
            if s < segno and s != self._segments[-1]:
                os.unlink(self._path(s))
                try:
                    os.unlink(jindex.idx_path(self._path(s)))
                except FileNotFoundError:
                    pass
                self._index.pop(s, None)
            else:
                keep.append(s)
        if len(keep) != len(self._segments):
            self._segments = keep
            _fsync_dir(self.directory)

    def segments(self) -> List[int]:
        return list(self._segments)

    def segment_size(self, segno: int) -> int:
        if segno == self._segments[-1]:
            return self._size
        return os.path.getsize(self._path(segno))

    def segment_mtime(self, segno: int) -> float:
        return os.path.getmtime(self._path(segno))

    def size(self) -> int:
        return sum(self.segment_size(s) for s in self._segments)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
