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

Opening a journal scans its last segment (``damage.classify``): only bytes past the last
acked record (``journal/acked``, written after each append's fdatasync) are a torn tail and
cut; a record that fails its checks with valid records after it, or inside what was acked,
is *damage*: kept, never returned as data, listed in ``damage`` and in
``journal/damage.json`` (durable), so the group can refuse the points that need it and the
repair can find it. A closed segment whose index file is missing or does not hold is read
whole (checksums checked, damage recorded the same way) and its index written again; a
version 1 index file (no pieces) is rewritten as version 2. ``verify`` checks every record
from a position on (the group runs it at open for what the replicas lack); ``read_at`` and
``read_from`` check every record they return and raise ``JournalCorrupt`` (one line: group,
disk, segment file, offset) at a record that fails or at known damage.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import time
from typing import Dict, Iterator, List, Optional, Tuple

import xxhash

from formats import jindex
from formats import reads as _reads
from formats.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from formats.durable import fsync_dir as _fsync_dir
from formats.durable import write_atomic
from formats.records import (
    DATA_KINDS,
    JOURNAL_KINDS,
    KIND_APPLIED,
    KIND_CHECKPOINT,
    KIND_SEEDED,
    JRecord,
)
from formats.segment import CHECKED as _CHECKED
from formats.segment import MAGIC, RECORD

from ..errors import JournalCorrupt
from . import damage as _damage
from . import reserve as _reserve
from .aio import write_behind
from .damage import Damage

__all__ = ["KIND_APPLIED", "KIND_SEEDED", "Damage", "JRecord", "Journal", "JournalCorrupt",
           "Position"]

log = logging.getLogger("ferry.replica")

SEGMENT_MAX = 64 * 1024 * 1024
# Without a reserve, the open segment's blocks are allocated ahead of its end (KEEP_SIZE:
# its size stays what the records make it): an append then writes into allocated blocks
# instead of allocating them at its fdatasync. Only while the file system keeps
# AHEAD_FREE bytes free beside them; what is left is given back when the segment closes.
AHEAD = 32 * 1024 * 1024
AHEAD_FREE = 1024 * 1024 * 1024
_SEGMENT_RE = re.compile(r"^seg-(\d{16})\.fjr$")

Position = Tuple[int, int]  # (segment number, byte offset in it)


def named(e: OSError, path: str) -> OSError:
    """``e`` naming ``path`` (an OSError from a call on a descriptor names no file)."""
    if e.filename:
        return e
    return OSError(e.errno, e.strerror or str(e), path)


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


def _holds(buf: memoryview, pos: int) -> Optional[int]:
    decoded = _decode_at(buf, pos)
    return None if decoded is None else decoded[1]


def _entry(buf: memoryview, pos: int) -> bytes:
    """The index entry of the (checked) record whose header is at ``pos``."""
    _m, kind, flags, disk, gen, length, seq, offset, time_ns, _c = RECORD.unpack_from(buf, pos)
    return jindex.ENTRY.pack(disk, kind, flags, gen, length, seq, offset, time_ns, pos)


class Journal:
    def __init__(self, directory: str, segment_max: int = SEGMENT_MAX,
                 segment_age: Optional[float] = None, group: str = "?",
                 disks: Optional[List[str]] = None) -> None:
        self.directory = directory
        self.segment_max = segment_max
        self.segment_age = segment_age
        self.group = group
        self.disk_names = list(disks or [])
        os.makedirs(directory, exist_ok=True)
        self.dropped_tail = 0  # bytes cut off at open
        self.rebuilt_indexes = 0  # closed segments whose index file was written again
        self.migrated_indexes = 0  # version 1 index files rewritten as version 2
        self._fd = -1
        self.reserve: Optional[_reserve.Reserve] = None  # set_reserve
        self._cut_pending = False  # a failed append could not be cut back yet
        self._index: Dict[int, bytearray] = {}
        self._first_at: Optional[float] = None  # monotonic time of the open segment's first append
        self._mark = _damage.AckedMark(directory)
        try:
            self.damage: List[Damage] = _damage.load(directory)
        except (ValueError, KeyError, TypeError) as e:
            raise JournalCorrupt("group %s: %s does not hold: %s" % (
                group, _damage.path(directory), e), _damage.path(directory)) from None
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
        if create and self.reserve is not None and self.reserve.take(self._path(segno)):
            create = False  # a spare slot, renamed: empty, its space allocated
            self._index[segno] = bytearray()
            _fsync_dir(self.directory)
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC | (os.O_CREAT | os.O_EXCL if create else 0)
        self._fd = os.open(self._path(segno), flags, 0o600)
        if create and self.reserve is not None:
            try:  # past the pool (views held the promoter back): as far as it goes
                self.reserve.allocate(self._fd, self._path(segno))
            except _reserve.ReserveError as e:
                log.warning("%s", e)
        if create:
            _fsync_dir(self.directory)
            self._index[segno] = bytearray()
        self._size = os.fstat(self._fd).st_size
        self._ahead = 0  # the open segment's blocks allocated up to here (allocate_ahead)

    def _allocate_ahead(self, nbytes: int) -> None:
        """Allocate the open segment's blocks past ``nbytes`` more (see ``AHEAD``)."""
        if self.reserve is not None or self._size + nbytes <= self._ahead:
            return
        start = max(self._ahead, self._size)
        end = self._size + nbytes + AHEAD
        try:
            st = os.fstatvfs(self._fd)
            if st.f_bavail * st.f_frsize < AHEAD_FREE + end - start:
                return
            fallocate(self._fd, FALLOC_FL_KEEP_SIZE, start, end - start)
            self._ahead = end
        except OSError:
            pass  # no room or no fallocate: the blocks come with the writes, as before

    def _release_ahead(self) -> None:
        """Give back the blocks allocated past the open segment's end."""
        if self._ahead > self._size:
            try:
                fallocate(self._fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, self._size,
                          self._ahead - self._size)
            except OSError as e:
                log.warning("group %s: %s keeps %d bytes allocated past its end: %s",
                            self.group, self._path(self._segments[-1]),
                            self._ahead - self._size, e.strerror or e)
        self._ahead = 0

    # -- reserved space (agent/target/reserve.py) ----------------------------------------

    def set_reserve(self, reserve: _reserve.Reserve, strict: bool = True) -> None:
        """Keep the journal in ``reserve``'s preallocated slots. ReserveError when the file
        system cannot hold them (``strict``: checked before anything is taken); without
        ``strict`` (an agent opening its groups) what it cannot take is logged."""
        try:
            reserve.fill([self._path(s) for s in self._segments], strict)
        except _reserve.ReserveError as e:
            if strict:
                raise
            log.warning("%s", e)
        self.reserve = reserve
        self.segment_max = min(self.segment_max, reserve.slot)

    # -- damage --------------------------------------------------------------------------

    def describe(self, d: Damage) -> str:
        """One line: the group, the disk, the segment file and the offset."""
        disk = "disk %s" % (self.disk_names[d.disk] if d.disk is not None and
                            d.disk < len(self.disk_names) else d.disk) \
            if d.disk is not None else "disk unknown"
        what = "%d damaged bytes at byte %d" % (d.end - d.offset, d.offset)
        if d.missing:
            what = "%d acknowledged bytes missing at byte %d" % (d.missing, d.end) \
                if d.end == d.offset else what + ", %d acknowledged bytes missing after it" \
                % d.missing
        return "group %s, %s: journal segment %s: %s" % (self.group, disk, self._path(d.segment),
                                                         what)

    def corrupt(self, d: Damage) -> JournalCorrupt:
        return JournalCorrupt(self.describe(d), self._path(d.segment), d)

    def _note(self, d: Damage) -> Damage:
        """Record damage (once per segment and offset), durably in damage.json."""
        for old in self.damage:
            if (old.segment, old.offset) == (d.segment, d.offset):
                return old
        self.damage.append(d)
        self.damage.sort(key=lambda x: (x.segment, x.offset))
        try:
            _damage.save(self.directory, self.damage)
        except OSError as e:  # kept in memory; a scan finds it again after a restart
            log.error("group %s: %s cannot be written: %s", self.group,
                      _damage.path(self.directory), e)
        return d

    def _note_scan(self, segno: int, raw: bytes, found: _damage.Classified) -> None:
        for start, end in found.damage:
            rng = _damage.header_range(memoryview(raw), start, end)
            missing = found.missing if end == len(raw) else 0
            self._note(Damage(segno, start, end, missing, "open", *(rng or (None, None, None))))

    def save_damage(self) -> None:
        """damage.json again (a repair was recorded); kept in memory if it cannot be."""
        try:
            _damage.save(self.directory, self.damage)
        except OSError as e:
            log.error("group %s: %s cannot be written: %s", self.group,
                      _damage.path(self.directory), e)

    def damage_from(self, pos: Position) -> Optional[Damage]:
        """The first damage at or after ``pos``, or None."""
        for d in self.damage:
            if (d.segment, d.offset) >= pos and (d.segment in self._index
                                                 or d.segment > self._segments[-1]):
                return d
        return None

    # -- opening -------------------------------------------------------------------------

    def _scan(self, segno: int, acked: Optional[int]) -> Tuple[bytearray, _damage.Classified]:
        """Index entries of the records that hold, and what the scan found."""
        with open(self._path(segno), "rb") as f:
            raw = f.read()
        found = _damage.classify(raw, _holds, acked)
        buf = memoryview(raw)
        entries = bytearray()
        for pos, _after in found.records:
            entries += _entry(buf, pos)
        self._note_scan(segno, raw, found)
        return entries, found

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
            # Every byte of a closed segment was acked: what fails is damage, never a tail;
            # an index that holds but covers more says how much is missing.
            covers = jindex.idx_covers(raw)
            built, _found = self._scan(segno, max(size, covers or 0))
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
        mark = self._mark.read()
        if mark is not None and mark[0] > last:
            # Segments that were acked are gone altogether.
            self._note(Damage(mark[0], 0, 0, mark[1]))
        acked = mark[1] if mark is not None and mark[0] == last else None
        entries, found = self._scan(last, acked)
        if found.cut is not None:
            self.dropped_tail = os.path.getsize(path) - found.cut
            os.truncate(path, found.cut)
        self._open_segment(last, create=False)
        self._index[last] = entries
        if entries:
            self._first_at = time.monotonic()
        if self.dropped_tail:
            os.fdatasync(self._fd)

    def verify(self, pos: Position, last: bool = False) -> List[Damage]:
        """Check every record from ``pos`` on (the last segment, checked at open, only with
        ``last``); record what fails as damage and return it."""
        out = []
        for s in self._segments if last else self._segments[:-1]:
            if s < pos[0]:
                continue
            with open(self._path(s), "rb") as f:
                try:
                    buf = memoryview(f.read(self.segment_size(s)))
                except OSError as err:  # names the segment (formats/reads.py)
                    raise _reads.failed(err, 0, self.segment_size(s), self._path(s)) from None
            starts = [e[8] for e in jindex.entries(self.index(s))]
            for n, p in enumerate(starts):
                if (s, p) < pos or _holds(buf, p) is not None:
                    continue
                end = starts[n + 1] if n + 1 < len(starts) else len(buf)
                out.append(self._note_read(s, p, end))
        return out

    def _note_read(self, segno: int, pos: int, end: Optional[int] = None) -> Damage:
        """Damage at a record the index knows (its entry was made from a checked record)."""
        for e in jindex.entries(self.index(segno)):
            if e[8] == pos:
                size = RECORD.size + (e[4] if e[1] in DATA_KINDS else 0)
                is_range = e[1] < KIND_SEEDED or e[1] == KIND_APPLIED
                return self._note(Damage(segno, pos, end if end is not None else pos + size,
                                         0, "read", e[0] if e[1] < KIND_CHECKPOINT else None,
                                         e[6] if is_range else None,
                                         e[4] if is_range else None, e[1]))
        return self._note(Damage(segno, pos, end if end is not None else pos, 0, "read"))

    # -- writing -------------------------------------------------------------------------

    @property
    def end(self) -> Position:
        return self._segments[-1], self._size

    @property
    def start(self) -> Position:
        return self._segments[0], 0

    def _due_to_close(self, nbytes: int = 0) -> bool:
        if self._size >= self.segment_max:
            return True
        if self.reserve is not None and self._size and self._size + nbytes > self.reserve.slot:
            return True  # the batch would pass the segment's preallocated slot
            return True
        return (self.segment_age is not None and self._first_at is not None
                and time.monotonic() - self._first_at >= self.segment_age)

    def rotate(self) -> None:
        """Close the segment being written (if it holds anything) and start a new one."""
        if self._size == 0:
            return
        self._release_ahead()
        old = self._segments[-1]
        entries = bytes(self._index[old])
        if self.reserve is not None:  # the index file needs free blocks: from the room
            self.reserve.room_for(lambda: self._write_index(old, entries, self._size),
                                  2 * len(entries) + 256 * 1024)
        else:
            self._write_index(old, entries, self._size)
        segno = old + 1
        self._open_segment(segno, create=True)
        self._segments.append(segno)
        self._first_at = None

    def append(self, records: List[JRecord]) -> Position:
        """Write ``records`` and make them durable; return the journal's new end. The acked
        mark (``damage.AckedMark``) moves after the fdatasync."""
        if not records:
            return self.end
        if self._cut_pending:
            try:
                os.ftruncate(self._fd, self._size)
            except OSError as e:
                raise named(e, self._path(self._segments[-1])) from None
            self._cut_pending = False
            self._ahead = 0
        nbytes = sum(RECORD.size + (len(r.data or b"") if r.kind in DATA_KINDS else 0)
                     for r in records)
        if self._due_to_close(nbytes):
            self.rotate()
        self._allocate_ahead(nbytes)
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
            written = write_behind(self._fd, parts, self._size)
            os.fdatasync(self._fd)
        except OSError as e:
            # Leave no partial batch behind a later append: cut the segment back.
            try:
                os.ftruncate(self._fd, self._size)
                self._ahead = 0  # the cut gave back what lay past the end
            except OSError:
                self._cut_pending = True  # cut before anything else is appended
                log.error("group %s: %s cannot be cut back to %d bytes", self.group,
                          self._path(self._segments[-1]), self._size)
            raise named(e, self._path(self._segments[-1])) from None
        self._size += written
        self._index[self._segments[-1]] += entries
        if self._first_at is None:
            self._first_at = time.monotonic()
        self._mark.write(self._segments[-1], self._size)
        return self.end

    # -- reading -------------------------------------------------------------------------

    def index(self, segno: int) -> bytes:
        """The index entries of a segment (``jindex.ENTRY``), in record order."""
        return bytes(self._index[segno])

    def read_at(self, segno: int, pos: int) -> JRecord:
        """The record whose header is at ``pos`` of segment ``segno``, checked;
        JournalCorrupt (and the damage recorded) if it fails."""
        path = self._path(segno)
        with open(path, "rb") as f:
            want = RECORD.size
            try:
                f.seek(pos)
                head = f.read(RECORD.size)
                if len(head) == RECORD.size:
                    kind, length = head[4], struct.unpack_from("<I", head, 12)[0]
                    want += length if kind in DATA_KINDS else 0
                    head += f.read(want - RECORD.size)
            except OSError as e:  # names the segment and the record (formats/reads.py)
                raise _reads.failed(e, pos, want, path) from None
        decoded = _decode_at(memoryview(head), 0)
        if decoded is None:
            raise self.corrupt(self._note_read(segno, pos))
        return decoded[0]

    def read_from(self, pos: Position, stop: Optional[Position] = None,
                  skip: Tuple[Tuple[int, int], ...] = ()
                  ) -> Iterator[Tuple[JRecord, Position]]:
        """Records from ``pos`` (to ``stop`` or the end), each checked, with the position
        after it; JournalCorrupt at the first that fails or at known damage, but for the
        damage ``skip`` names (by ``Damage.key``: repaired, passed over)."""
        segno, offset = pos
        end = stop if stop is not None else self.end
        for s in list(self._segments):
            if s < segno or s > end[0]:
                continue
            start = offset if s == segno else 0
            limit = end[1] if s == end[0] else self.segment_size(s)
            passed = [(d.offset, max(d.end, d.offset + 1)) for d in self.damage
                      if d.segment == s and d.key() in skip]
            known = [d for d in self.damage if d.segment == s and start <= d.offset < limit
                     and d.key() not in skip]
            with open(self._path(s), "rb") as f:
                try:
                    f.seek(start)
                    buf = memoryview(f.read(max(0, limit - start)))
                except OSError as err:
                    raise _reads.failed(err, start, limit - start, self._path(s)) from None
            for e in jindex.entries(self.index(s)):
                p = e[8]
                if p < start:
                    continue
                if p >= limit:
                    break
                if known and p >= known[0].offset:
                    raise self.corrupt(known[0])
                if any(a <= p < b for a, b in passed):
                    continue
                decoded = _decode_at(buf, p - start)
                if decoded is None:
                    raise self.corrupt(self._note_read(s, p))
                record, after = decoded
                yield record, (s, start + after)
            if known:
                raise self.corrupt(known[0])

    def drop_before(self, segno: int) -> None:
        """Delete whole segments older than ``segno`` (never the one being written), and
        their index files."""
        keep = []
        for s in self._segments:
            if s < segno and s != self._segments[-1]:
                if self.reserve is not None:
                    self.reserve.recycle(self._path(s))  # its blocks stay the journal's
                else:
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
            if self.reserve is not None:
                self.reserve.refill()
            gone = [d for d in self.damage if d.segment < keep[0]]
            if gone:  # applied before it was found: the replicas hold it
                self.damage = [d for d in self.damage if d not in gone]
                _damage.save(self.directory, self.damage)

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
            self._release_ahead()
            os.close(self._fd)
            self._fd = -1
        self._mark.close(sync=True)


def journal_kinds(group_dir: str, group: str) -> List[Tuple[int, int]]:
    """(disk, kind) of every disk record of a group's journal, in journal order (what
    ``meta.rebuild`` reads); nothing when it has no journal."""
    directory = os.path.join(group_dir, "journal")
    if not os.path.isdir(directory):
        return []
    j = Journal(directory, group=group)
    try:
        return [(e[0], e[1]) for s in j.segments() for e in jindex.entries(j.index(s))
                if e[1] < KIND_CHECKPOINT]
    finally:
        j.close()
