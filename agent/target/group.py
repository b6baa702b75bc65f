"""A protection group on the target site: its journal, its replicas, and the applier.

Theory of operation
-------------------
``accept`` takes a batch of records from the wire, checks all of them (disk, bounds,
sequence) before anything is written, appends the new ones to the journal (durable when it
returns: the caller may ack them), then lets the applier catch up.

The applier copies journal records, in journal order, to the replica files. It holds back
at the first record written while its disk was being resynced (``FLAG_INCONSISTENT``)
until that disk's ``KIND_CONSISTENT`` marker is in the journal too, so a replica is always
a crash-consistent state of its disk, the newest one known to be whole. A disk that has
never been whole (its initial sync is running) is applied as it comes.

The replica holds the oldest point of the group's history. Once every disk has been whole
once, the applier (the *promoter*) only applies closed segments that have left the history
window (``history_s``, by the segment file's time of last append) or that the journal must
shed to stay under ``journal_max`` bytes; before that (an initial sync is running, there is
no point in time to keep) it applies everything as it comes. While a view or a test
failover reads a group, nothing is promoted.

During the initial sync of a disk (it was never whole, nothing before it is waiting to be
applied, no view pins the group, it has no seed) there is no history to keep, so ``accept``
writes that disk's changes straight to its replica, in stream order, fdatasyncs it, and
only then journals them as ``KIND_APPLIED`` records: the header without the data. Site B
writes each byte once instead of twice. Before the first such write after records journaled
whole, a checkpoint makes those durable in the replica and moves meta.json's position past
them, so a restart never re-applies an older change on top of a newer one. A crash between
the replica's fdatasync and the journal's leaves the replica ahead of the journal with
changes that were never acked; the source sends them again, and every
range it owes is written again before the disk's ``consistent`` marker, so no state that
mixes them is ever offered. The disk's own ``consistent`` marker ends this: from there on its
changes are journaled whole.

Every ``CHECKPOINT_BYTES`` applied, after a promotion, and on close, the replicas are
fdatasynced, then ``meta.json`` records the journal position applied so far (atomic
replace), then whole segments before it are deleted. A crash between those steps re-applies
records from the last recorded position, which is harmless: applying a record twice in order
gives the same bytes.

Group checkpoints arrive with a batch and are journaled after its records, as
``KIND_CHECKPOINT`` markers. The state of disk d at checkpoint C is the replica plus the
journaled records of d after the replica's point up to C's cut for d; C is available while
the replica of every disk is not past its cut.

Sequence rules for a disk whose newest journaled record is (G, S): a record of a lower
generation, or of G with a sequence up to S, is a duplicate and dropped; (G, S+1) and
(G' > G, 1) are next; anything else is a gap and a protocol error.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterator, List, Optional, Tuple

from formats import jindex
from formats.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from formats.durable import fsync_parent as _fsync_parent
from formats.durable import write_atomic
from formats.jindex import KIND_CHECKPOINT, KIND_FAILOVER
from formats.localwire import (
    FLAG_INCONSISTENT,
    KIND_CONSISTENT,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
)

from ..checkpoints import Checkpoint, CheckpointError, Point
from ..errors import Conflict, NotFound
from ..protocol.frames import MAX_RECORD, ProtocolError
from . import seeds as seed
from .journal import KIND_APPLIED, KIND_SEEDED, SEGMENT_MAX, Journal, JRecord, Position

log = logging.getLogger("ferry.replica")

CHECKPOINT_BYTES = 256 * 1024 * 1024
DEFAULT_HISTORY = 4 * 3600
DEFAULT_JOURNAL_MAX = 50 * 1024 ** 3


class SizeMismatch(Conflict):
    pass


class NoConsistentState(NotFound):
    pass


@dataclass
class DiskState:
    name: str
    size: int
    gen: int = 0            # newest journaled record
    seq: int = 0
    applied_gen: int = 0    # newest record applied to the replica
    applied_seq: int = 0
    ever_consistent: bool = False
    holding: bool = False   # the applier waits for this disk's resync to end
    consistent_pending: int = 0  # CONSISTENT markers journaled but not yet applied
    extra: Dict[str, Any] = field(default_factory=dict)


class _Head:
    """Where an applier with no window would stop: each disk's newest whole point.

    Kept incrementally (status asks often, and the journal can hold millions of records):
    it scans index entries once, from the replicas' point, and waits at a record written
    during a resync until that disk's ``consistent`` marker is journaled (the hold-back
    rule of the applier)."""

    def __init__(self, group: TargetGroup) -> None:
        self.segno, self.i = group.applied[0], -1  # -1: find the first entry at applied
        self.offset = group.applied[1]
        self.points = [(d.applied_gen, d.applied_seq) for d in group.disks]
        self.ever = [d.ever_consistent for d in group.disks]
        self.ahead = [0] * len(group.disks)  # consistent markers journaled past the scan
        for segno in group.journal.segments():
            if segno < self.segno:
                continue
            for e in jindex.entries(group.journal.index(segno)):
                if e[1] == KIND_CONSISTENT and (segno > self.segno or e[8] >= self.offset):
                    self.ahead[e[0]] += 1
        self.held = False

    def appended(self, records: List[JRecord]) -> None:
        for r in records:
            if r.kind == KIND_CONSISTENT:
                self.ahead[r.disk] += 1

    def advance(self, journal: Journal) -> None:
        segments = journal.segments()
        while True:
            index = journal.index(self.segno)
            n = len(index) // jindex.ENTRY.size
            if self.i < 0:
                self.i = 0
                while self.i < n and jindex.ENTRY.unpack_from(
                        index, self.i * jindex.ENTRY.size)[8] < self.offset:
                    self.i += 1
            while self.i < n:
                disk, kind, flags, gen, _l, seq = jindex.ENTRY.unpack_from(
                    index, self.i * jindex.ENTRY.size)[:6]
                if kind < KIND_CHECKPOINT:
                    if flags & FLAG_INCONSISTENT and self.ever[disk] and not self.ahead[disk]:
                        self.held = True
                        return
                    if kind == KIND_CONSISTENT:
                        self.ahead[disk] -= 1
                        self.ever[disk] = True
                    self.points[disk] = (gen, seq)
                self.i += 1
            self.held = False
            later = [s for s in segments if s > self.segno]
            if not later:
                return
            self.segno, self.i, self.offset = later[0], 0, 0


class TargetGroup:
    def __init__(self, directory: str, name: str, disks: List[Tuple[str, int]],
                 protection: Optional[str] = None, history_s: Optional[float] = None,
                 journal_max: Optional[int] = None, segment_max: int = SEGMENT_MAX) -> None:
        """Open (or create) the group's storage; ``disks`` are (name, size) in group order.

        ``protection`` identifies one protection of the group on the source; a new one
        (the group was unprotected and protected again) starts a new stream: the journal is
        dropped and the replicas wait for their initial sync, keeping their old content."""
        self.directory = directory
        self.name = name
        self._lock = threading.Lock()
        os.makedirs(os.path.join(directory, "replicas"), exist_ok=True)
        self._meta_path = os.path.join(directory, "meta.json")
        meta = self._read_meta()
        # Every check before anything changes: a refused group keeps all it had.
        held = [(d["name"], d["size"]) for d in meta.get("disks", [])]
        if held and held != list(disks):
            raise SizeMismatch("group %s holds disks %s here; the source sent %s" % (
                name, ", ".join("%s (%d bytes)" % d for d in held),
                ", ".join("%s (%d bytes)" % d for d in disks)))
        self.history_s = float(history_s if history_s is not None
                               else meta.get("history_s", DEFAULT_HISTORY))
        self.journal_max = int(journal_max if journal_max is not None
                               else meta.get("journal_max", DEFAULT_JOURNAL_MAX))
        self.tags: Dict[str, List[str]] = dict(meta.get("tags", {}))
        self.failover: Optional[Dict[str, Any]] = meta.get("failover")
        self.pins = 0            # open views and tests: nothing is promoted while > 0
        self._last_status: Optional[Dict[str, Any]] = None
        self.short_history = False  # the journal limit keeps less than history_s
        self.protection = meta.get("protection") if protection is None else protection
        if meta and self.protection != meta.get("protection"):
            log.warning("group %s: a new protection replaces the old one; its replicas wait "
                        "for a full sync", name)
            shutil.rmtree(os.path.join(directory, "journal"), ignore_errors=True)
            shutil.rmtree(os.path.join(directory, "seeds"), ignore_errors=True)
            meta = {"disks": [dict(d, applied_gen=0, applied_seq=0, ever_consistent=False)
                              for d in meta.get("disks", [])]}
        known = {d["name"]: d for d in meta.get("disks", [])}
        self.disks: List[DiskState] = []
        for dname, size in disks:
            old = known.get(dname)
            st = DiskState(dname, size)
            if old is not None:
                st.applied_gen, st.applied_seq = old["applied_gen"], old["applied_seq"]
                st.ever_consistent = old["ever_consistent"]
            st.gen, st.seq = st.applied_gen, st.applied_seq
            self.disks.append(st)
        self._fds: List[int] = []
        for st in self.disks:
            path = self.replica_path(st.name)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.fstat(fd).st_size != st.size:
                os.ftruncate(fd, st.size)
                os.fsync(fd)
            self._fds.append(fd)
        # New directories and files must survive a crash too.
        _fsync_parent(os.path.join(directory, "replicas", "x"))
        _fsync_parent(directory)
        _fsync_parent(os.path.join(directory, "replicas"))
        self.journal = Journal(os.path.join(directory, "journal"), segment_max,
                               self._segment_age())
        if self.journal.dropped_tail:
            log.warning("group %s: dropped a torn journal tail of %d bytes",
                        name, self.journal.dropped_tail)
        applied = meta.get("applied")
        self.applied: Position = (applied[0], applied[1]) if applied else self.journal.start
        if self.applied < self.journal.start:
            self.applied = self.journal.start
        self._since_checkpoint = 0
        # meta.json's applied position and the disks' points there (see _save_meta), and
        # whether the journal holds records after it that a restart would apply again.
        self._meta_point: Optional[Tuple[Position, List[Tuple[int, int]]]] = None
        self._whole_after_meta = False
        # A pre-seeded disk's seed lasts until its initial sync ends (agent/target/seeds.py).
        self.seeds: List[Optional[seed.SeedMap]] = [
            None if st.ever_consistent else seed.load(directory, st.name, st.size)
            for st in self.disks]
        for st, m in zip(self.disks, self.seeds):
            if m is None:
                seed.drop(directory, st.name)
        # Learn what the journal holds beyond the replicas, and its checkpoints.
        self.checkpoints: List[Checkpoint] = []
        self._load_checkpoints()
        whole = False
        for rec, _pos in self.journal.read_from(self.applied):
            if rec.kind >= KIND_CHECKPOINT:
                continue
            st = self.disks[rec.disk]
            st.gen, st.seq = rec.gen, rec.seq
            if rec.kind == KIND_CONSISTENT:
                st.consistent_pending += 1
            whole = whole or rec.kind in (KIND_WRITE, KIND_ZERO, KIND_TRIM)
            self._seed_note(rec)
        self._save_meta(synced=True)  # the position it was loaded from
        self._whole_after_meta = whole
        self._head_state = _Head(self)
        if self.failover is None:
            self._promote()
        elif self.failover.get("state") != "done":
            self._finish_failover()  # a crash stopped it half-way: do it again

    # -- paths and metadata --------------------------------------------------------------

    def replica_path(self, disk: str) -> str:
        return os.path.join(self.directory, "replicas", disk + ".img")

    def _read_meta(self) -> Dict[str, Any]:
        try:
            with open(self._meta_path) as f:
                meta: Dict[str, Any] = json.load(f)
                return meta
        except FileNotFoundError:
            return {}

    def _segment_age(self) -> float:
        """Segments close at this age, so the window is trimmed in steps of about 1/8."""
        return max(1.0, min(300.0, self.history_s / 8))

    def set_limits(self, history_s: float, journal_max: int) -> None:
        with self._lock:
            if (history_s, journal_max) != (self.history_s, self.journal_max):
                self.history_s, self.journal_max = float(history_s), int(journal_max)
                self.journal.segment_age = self._segment_age()
                self._save_meta()

    def _load_checkpoints(self) -> None:
        for segno in self.journal.segments():
            for e in jindex.entries(self.journal.index(segno)):
                if e[1] == KIND_CHECKPOINT:
                    rec = self.journal.read_at(segno, e[8])
                    assert rec.data is not None
                    c = Checkpoint.decode(rec.data)
                    c.tags = self.tags.get(c.id, [])
                    self.checkpoints.append(c)

    def _save_meta(self, synced: bool = False) -> None:
        """Write meta.json. Its applied position (where a restart re-applies the journal
        from) moves only with ``synced``: when the replicas hold everything before
        ``applied`` durably; other saves (tags, limits) keep the last synced one."""
        if synced or self._meta_point is None:
            self._meta_point = (self.applied,
                                [(d.applied_gen, d.applied_seq) for d in self.disks])
            self._whole_after_meta = False
        applied, points = self._meta_point
        meta = {
            "group": self.name,
            "protection": self.protection,
            "history_s": self.history_s,
            "journal_max": self.journal_max,
            "tags": self.tags,
            "failover": self.failover,
            "applied": list(applied),
            "disks": [{"name": d.name, "size": d.size, "applied_gen": p[0],
                       "applied_seq": p[1], "ever_consistent": d.ever_consistent}
                      for d, p in zip(self.disks, points)],
        }
        write_atomic(self._meta_path, json.dumps(meta, indent=1).encode())

    # -- receiving -----------------------------------------------------------------------

    def durable(self) -> List[Tuple[int, int]]:
        """(gen, seq) of the newest journaled record of each disk."""
        return [(d.gen, d.seq) for d in self.disks]

    def accept(self, records: List[JRecord], checkpoints: Optional[List[Checkpoint]] = None,
               clocks: Optional[Tuple[int, int]] = None) -> Tuple[int, List[str]]:
        """Check, journal and promote a batch and its checkpoints; returns how many records
        were new and the ids of the batch's checkpoints now journaled. ``clocks`` are the
        batch's (wall_ns, mono_ns), to give each checkpoint its source wall time (without
        them, each checkpoint keeps the ``wall_ns`` it has)."""
        with self._lock:
            if self.failover is not None:
                raise ProtocolError("group %s failed over here; it takes no more changes"
                                    % self.name)
            fresh = self._check(records)
            cursor = [(d.gen, d.seq) for d in self.disks]
            for r in fresh:
                cursor[r.disk] = (r.gen, r.seq)
            known = {c.id for c in self.checkpoints}
            markers = []
            new_cps = []
            ids = []
            for c in checkpoints or []:
                if any(cur < cut for cur, cut in zip(cursor, c.cut)):
                    raise ProtocolError("checkpoint %s comes before the records of its cut"
                                        % c.id)
                ids.append(c.id)
                if c.id in known:
                    continue
                known.add(c.id)
                if clocks is not None:
                    c.wall_ns = clocks[0] - (clocks[1] - c.time_ns)
                data = c.encode()
                markers.append(JRecord(0, 0, 0, KIND_CHECKPOINT, 0, 0, len(data), c.time_ns,
                                       data))
                new_cps.append(c)
            if fresh or markers:
                fresh = self._apply_initial(fresh)
                if any(r.kind in (KIND_WRITE, KIND_ZERO, KIND_TRIM) for r in fresh):
                    self._whole_after_meta = True  # a restart would re-apply them
                self.journal.append(fresh + markers)
                for r in fresh:
                    st = self.disks[r.disk]
                    st.gen, st.seq = r.gen, r.seq
                    if r.kind == KIND_CONSISTENT:
                        st.consistent_pending += 1
                    self._seed_note(r)
                self.checkpoints.extend(new_cps)
                self._head_state.appended(fresh)
                self._head()
                self._promote()
            return len(fresh), ids

    def _check(self, records: List[JRecord]) -> List[JRecord]:
        """Every check before any write: a bad batch changes nothing."""
        cursor = [(d.gen, d.seq) for d in self.disks]
        fresh = []
        seeds: Dict[int, Optional[seed.SeedMap]] = {}  # as this batch leaves them
        for r in records:
            if not 0 <= r.disk < len(self.disks):
                raise ProtocolError("record for disk %d; group %s has %d disks"
                                    % (r.disk, self.name, len(self.disks)))
            st = self.disks[r.disk]
            if (r.kind == KIND_WRITE and r.length > MAX_RECORD) or r.offset < 0 \
                    or r.offset + r.length > st.size:
                raise ProtocolError("record [%d, +%d) outside disk %s of %d bytes"
                                    % (r.offset, r.length, st.name, st.size))
            if r.kind == KIND_WRITE and (r.data is None or len(r.data) != r.length):
                raise ProtocolError("write record with %s bytes of data for length %d"
                                    % (None if r.data is None else len(r.data), r.length))
            gen, seq = cursor[r.disk]
            if r.gen < gen or (r.gen == gen and r.seq <= seq):
                continue  # duplicate of a journaled record
            if not ((r.gen == gen and r.seq == seq + 1) or (r.gen > gen and r.seq == 1)):
                raise ProtocolError("disk %s: record %d/%d after %d/%d leaves a gap"
                                    % (st.name, r.gen, r.seq, gen, seq))
            cursor[r.disk] = (r.gen, r.seq)
            if r.kind == KIND_SEEDED or self.seeds[r.disk] is not None:
                r = self._check_seeded(r, seeds)
            fresh.append(r)
        return fresh

    def _check_seeded(self, r: JRecord, seeds: Dict[int, Optional[seed.SeedMap]]) -> JRecord:
        """Follow a batch's records through a copy of the disk's seed map: a SEEDED record
        must name untouched chunks that the seed holds as the source does."""
        if r.disk not in seeds:
            m = self.seeds[r.disk]
            seeds[r.disk] = m.copy() if m is not None else None
        m = seeds[r.disk]
        if r.kind == KIND_CONSISTENT:
            seeds[r.disk] = None
        if r.kind != KIND_SEEDED:
            if m is not None:
                m.touch(r.kind, r.offset, r.length)
            return r
        reason = "no seed (or its initial sync is over)" if m is None else \
            m.check(r.offset, r.length, r.data)
        if reason:
            raise ProtocolError("disk %s: %s" % (self.disks[r.disk].name, reason))
        return replace(r, data=None)  # nothing of it goes into the journal

    def _seed_note(self, r: JRecord) -> None:
        """A journaled record, for the disk's seed: touch it, or end it at ``consistent``."""
        m = self.seeds[r.disk]
        if m is None:
            return
        if r.kind == KIND_CONSISTENT:
            self.seeds[r.disk] = None
            seed.drop(self.directory, self.disks[r.disk].name)
        else:
            m.touch(r.kind, r.offset, r.length)

    def seed_frames(self) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int, int, bytes,
                                                                      bytes]]]:
        """What OPENED says (each disk's durable point) and, at the same instant, the SEED
        frames: (disk, chunk, first chunk, digests, touched map)."""
        with self._lock:
            return self.durable(), [(i, m.chunk, first, digests, touched)
                                    for i, m in enumerate(self.seeds) if m is not None
                                    for first, digests, touched in m.frames()]

    # -- applying ------------------------------------------------------------------------

    def _apply_initial(self, records: List[JRecord]) -> List[JRecord]:
        """Write the changes of disks in their initial sync straight to their replicas
        (durable when it returns) and give them back as KIND_APPLIED records; the others
        as they were (see the module)."""
        if self.pins or self.failover is not None or self.applied != self.journal.end:
            return records
        direct = {i for i, (st, m) in enumerate(zip(self.disks, self.seeds))
                  if not st.ever_consistent and not st.consistent_pending and m is None}
        if not direct:
            return records
        if self._whole_after_meta:
            # A restart would re-apply the journal from meta.json's position, and records
            # journaled whole since then would land on top of what goes straight to the
            # replicas now: make them durable and move that position to the journal's end.
            self._checkpoint()
            if self.applied != self.journal.end or self._whole_after_meta:
                return records
        # The applier's hold-back rule, followed through the batch: from a record it would
        # hold back on, the rest waits in the journal as usual, in journal order.
        ever = [st.ever_consistent for st in self.disks]
        pending = [st.consistent_pending for st in self.disks]
        for r in records:
            if r.kind == KIND_CONSISTENT:
                pending[r.disk] += 1
        out: List[JRecord] = []
        written = set()
        for n, r in enumerate(records):
            if r.flags & FLAG_INCONSISTENT and ever[r.disk] and not pending[r.disk]:
                out.extend(records[n:])
                break
            if r.kind == KIND_CONSISTENT:
                pending[r.disk] -= 1
                ever[r.disk] = True
                direct.discard(r.disk)  # whole from here: its changes keep their data
            elif r.disk in direct and r.kind in (KIND_WRITE, KIND_ZERO, KIND_TRIM):
                self._write_record(self._fds[r.disk], r)
                written.add(r.disk)
                r = replace(r, kind=KIND_APPLIED, data=None)
            out.append(r)
        for i in sorted(written):
            os.fdatasync(self._fds[i])
        return out

    @staticmethod
    def _write_record(fd: int, rec: JRecord) -> None:
        if rec.kind == KIND_WRITE:
            assert rec.data is not None
            view = memoryview(rec.data)
            off = rec.offset
            while view:
                n = os.pwrite(fd, view, off)
                view, off = view[n:], off + n
        elif rec.length:
            fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, rec.offset, rec.length)

    def _apply(self, stop: Optional[Position] = None) -> None:
        pos = self.applied
        for rec, after in self.journal.read_from(pos, stop):
            if rec.kind >= KIND_CHECKPOINT:
                pos = after
                continue
            st = self.disks[rec.disk]
            if rec.flags & FLAG_INCONSISTENT and st.ever_consistent and not st.consistent_pending:
                if not st.holding:
                    log.info("group %s: disk %s is resyncing; its replica stays at %d/%d "
                             "until the resync ends", self.name, st.name, st.applied_gen,
                             st.applied_seq)
                st.holding = True
                break
            if rec.kind in (KIND_WRITE, KIND_ZERO, KIND_TRIM):
                self._write_record(self._fds[rec.disk], rec)
                self._since_checkpoint += rec.length if rec.kind == KIND_WRITE else 0
            elif rec.kind == KIND_APPLIED:
                self._since_checkpoint += rec.length  # in the replica already
            elif rec.kind == KIND_CONSISTENT:
                st.consistent_pending -= 1
                st.ever_consistent = True
                st.holding = False
            st.applied_gen, st.applied_seq = rec.gen, rec.seq
            pos = after
            if self._since_checkpoint >= CHECKPOINT_BYTES:
                self.applied = pos
                self._checkpoint()
        # A checkpoint at a segment's end moved ``applied`` on to the next segment and
        # dropped this one: never step back onto it.
        self.applied = max(self.applied, pos)

    def _checkpoint(self) -> None:
        if self.failover is not None:
            return  # the replicas are live disks now: nothing moves in the journal
        for fd in self._fds:
            os.fdatasync(fd)
        for st, m in zip(self.disks, self.seeds):
            if m is not None and m.changed:
                seed.save_touched(self.directory, st.name, m)
        segments = self.journal.segments()
        if self.applied[0] != segments[-1] and \
                self.applied[1] >= self.journal.segment_size(self.applied[0]):
            # A whole segment applied: start at the next one, so this one can go.
            self.applied = (segments[segments.index(self.applied[0]) + 1], 0)
        self._save_meta(synced=True)
        self.journal.drop_before(self.applied[0])
        self._since_checkpoint = 0
        before = len(self.checkpoints)
        self.checkpoints = [c for c in self.checkpoints if self._reachable(c)]
        if len(self.checkpoints) != before:
            log.debug("group %s: %d checkpoints left the window", self.name,
                      before - len(self.checkpoints))

    def _reachable(self, c: Checkpoint) -> bool:
        return all((d.applied_gen, d.applied_seq) <= cut for d, cut in zip(self.disks, c.cut))

    def _eager(self) -> bool:
        """Before every disk was whole once there is no point in time worth keeping."""
        return not all(d.ever_consistent for d in self.disks)

    def _promote(self) -> None:
        """Apply what leaves the window or passes the journal's limit (see the module)."""
        if self.pins:
            return
        if self._eager():
            self._apply()
            if self._eager():
                return
            self._checkpoint()  # the first whole state: history starts here
            return
        segments = self.journal.segments()
        total = self.journal.size()
        now = time.time()
        limit = self.applied
        over_limit = False   # a segment inside the window goes for the limit
        aged_out = False     # a segment goes because it left the window
        for segno in segments:
            if segno < self.applied[0]:
                continue
            old = self.journal.segment_mtime(segno) < now - self.history_s
            over = total > self.journal_max
            if not (old or over):
                break
            if segno == segments[-1]:
                if not over or self.journal.segment_size(segno) == 0:
                    break
                self.journal.rotate()  # the limit needs even the newest records applied
                segments = self.journal.segments()
            over_limit = over_limit or not old
            aged_out = aged_out or old
            limit = (segments[segments.index(segno) + 1], 0)
            total -= self.journal.segment_size(segno)
        short = True if over_limit else (False if aged_out else self.short_history)
        if short != self.short_history:
            self.short_history = short
            if short:
                log.warning("group %s: ALERT: the journal reached its limit of %d bytes; it "
                            "keeps less than the configured history of %g s", self.name,
                            self.journal_max, self.history_s)
            else:
                log.info("group %s: the journal keeps the configured history again",
                         self.name)
        if limit > self.applied:
            before = self.applied
            self._apply(limit)
            if self.applied != before:  # a resync's hold-back may stop it where it was
                self._checkpoint()

    def maintain(self) -> None:
        """Promote what aged out of the window (called now and then, not only on batches)."""
        with self._lock:
            if self.failover is None:
                self._promote()

    def checkpoint(self) -> None:
        with self._lock:
            self._checkpoint()

    # -- reading -------------------------------------------------------------------------

    def _entries_from(self, pos: Position) -> Iterator[Tuple[int, Tuple[int, ...]]]:
        """(segment, index entry) of every record from ``pos`` on, in journal order."""
        for segno in self.journal.segments():
            if segno < pos[0]:
                continue
            for e in jindex.entries(self.journal.index(segno)):
                if segno == pos[0] and e[8] < pos[1]:
                    continue
                yield segno, e

    def _head(self) -> Tuple[List[Point], bool]:
        """Each disk's newest point that is whole (where an applier with no window would
        stop), and whether a resync holds it back."""
        h = self._head_state
        if h.segno not in self.journal.segments():
            h = self._head_state = _Head(self)  # the applier deleted where it stood
        h.advance(self.journal)
        return list(h.points), h.held

    def _index_of(self, disk: str) -> int:
        for i, st in enumerate(self.disks):
            if st.name == disk:
                return i
        raise CheckpointError("group %s has no disk %s (it has %s)"
                              % (self.name, disk, ", ".join(d.name for d in self.disks)))

    def point(self, ref: Optional[str] = None, at_wall_ns: Optional[int] = None
              ) -> Tuple[Optional[Checkpoint], List[Point], bool]:
        """The checkpoint chosen (None: the newest whole state), each disk's cut, and
        whether a resync holds the newest state back. Call with the lock held."""
        for st in self.disks:
            if not st.ever_consistent:
                raise NoConsistentState(
                    "disk %s of group %s has no consistent state yet: its initial sync has "
                    "not ended" % (st.name, self.name))
        if ref is None and at_wall_ns is None:
            points, held = self._head()
            return None, points, held
        from ..checkpoints import choose
        c = choose(self.checkpoints, ref, at_wall_ns)
        return c, list(c.cut), False

    def _overlay(self, index: int, upto: Point) -> Iterator[Tuple[int, Tuple[int, ...]]]:
        """The journal records of disk ``index`` between the replica and ``upto``."""
        st = self.disks[index]
        base = (st.applied_gen, st.applied_seq)
        for segno, e in self._entries_from(self.applied):
            if e[0] == index and e[1] < KIND_CHECKPOINT and base < (e[3], e[5]) <= upto:
                yield segno, e

    def _write_overlay(self, fd: int, index: int, upto: Point) -> None:
        """Apply to ``fd`` the records of disk ``index`` up to ``upto`` (journal order)."""
        for segno, e in self._overlay(index, upto):
            kind, offset, length = e[1], e[6], e[4]
            if kind == KIND_WRITE:
                rec = self.journal.read_at(segno, e[8])
                assert rec.data is not None
                view = memoryview(rec.data)
                while view:
                    n = os.pwrite(fd, view, offset)
                    view, offset = view[n:], offset + n
            elif kind in (KIND_ZERO, KIND_TRIM):
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    def restore(self, disk: str, dest: str, ref: Optional[str] = None,
                at_wall_ns: Optional[int] = None) -> Dict[str, Any]:
        """Write ``disk`` as of a checkpoint (default: its newest consistent state) to the
        new file ``dest``; durable (data and name) when it returns."""
        with self._lock:
            index = self._index_of(disk)
            st = self.disks[index]
            c, cut, held = self.point(ref, at_wall_ns)
            tmp = dest + ".ferry-partial"
            _sparse_copy(self.replica_path(disk), tmp, st.size)
            fd = os.open(tmp, os.O_WRONLY | os.O_CLOEXEC)
            try:
                self._write_overlay(fd, index, cut[index])
                os.fdatasync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, dest)
            _fsync_parent(dest)
            return {"group": self.name, "disk": disk, "to": dest, "size": st.size,
                    "gen": cut[index][0], "seq": cut[index][1], "resyncing": held,
                    "checkpoint": c.to_json() if c else None}

    def view_spec(self, ref: Optional[str], at_wall_ns: Optional[int]
                  ) -> Tuple[Optional[Checkpoint], List[Dict[str, Any]]]:
        """Pin the group (no promotion) and describe each disk at a point for the view
        plugin (``nbd_plugin/view.py``). ``unpin`` when the view is closed."""
        with self._lock:
            c, cut, _held = self.point(ref, at_wall_ns)
            self.pins += 1
            segments = [[segno, self.journal.path(segno), self.journal.segment_size(segno)]
                        for segno in self.journal.segments() if segno >= self.applied[0]]
            specs = []
            for i, st in enumerate(self.disks):
                specs.append({"replica": self.replica_path(st.name), "size": st.size,
                              "disk": i, "base": [st.applied_gen, st.applied_seq],
                              "upto": list(cut[i]), "start": list(self.applied),
                              "segments": segments})
            return c, specs

    def failover_live(self, ref: Optional[str], at_wall_ns: Optional[int]) -> Dict[str, Any]:
        """Make the replicas the disks as of a point (default: the newest consistent state)
        and take no more changes. Durable when it returns; a crash half-way is finished
        when the group is opened again (the same records are applied again, in order)."""
        with self._lock:
            if self.failover is not None:
                raise CheckpointError("group %s already failed over here" % self.name)
            if self.pins:
                raise CheckpointError("group %s has views or a test failover open; close them "
                                      "first" % self.name)
            c, cut, _held = self.point(ref, at_wall_ns)
            self.failover = {"state": "applying", "checkpoint": c.to_json() if c else None,
                             "cut": [list(p) for p in cut], "wall_ns": time.time_ns()}
            self._save_meta()
            self._finish_failover()
            return dict(self.failover)

    def _finish_failover(self) -> None:
        assert self.failover is not None
        cut = [(p[0], p[1]) for p in self.failover["cut"]]
        for i, fd in enumerate(self._fds):
            self._write_overlay(fd, i, cut[i])
            os.fdatasync(fd)
        data = json.dumps(self.failover, sort_keys=True).encode()
        self.journal.append([JRecord(0, 0, 0, KIND_FAILOVER, 0, 0, len(data), 0, data)])
        for st, p in zip(self.disks, cut):
            st.applied_gen, st.applied_seq = p
        self.failover["state"] = "done"
        self._save_meta(synced=True)  # the replicas were fdatasynced at the cut
        c = self.failover.get("checkpoint")
        log.warning("group %s: FAILED OVER LIVE at %s; its replicas are the live disks now and "
                    "replication of it has stopped", self.name,
                    "checkpoint %s" % c["id"] if c else "its newest consistent state")

    def unpin(self) -> None:
        with self._lock:
            self.pins = max(0, self.pins - 1)

    def add_tag(self, cid: str, tag: str) -> None:
        with self._lock:
            tags = self.tags.setdefault(cid, [])
            if tag not in tags:
                tags.append(tag)
                for c in self.checkpoints:
                    if c.id == cid:
                        c.tags = tags
                self._save_meta()

    def list_checkpoints(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [c.to_json() for c in self.checkpoints]

    def _disk(self, name: str) -> DiskState:
        for st in self.disks:
            if st.name == name:
                return st
        raise NotFound("group %s has no disk %s" % (self.name, name))

    def status(self) -> Dict[str, Any]:
        """The group's status. It is asked from the agent's event loop: while the lock is
        busy (a batch, a long restore) the last answer is given again, marked ``stale``."""
        if not self._lock.acquire(timeout=0.2):
            if self._last_status is None:
                return {"stale": True, "disks": {}, "journal_bytes": 0}
            return dict(self._last_status, stale=True)
        try:
            self._last_status = self._status()
            return self._last_status
        finally:
            self._lock.release()

    def _status(self) -> Dict[str, Any]:
        head, held = self._head()
        now_ns = time.time_ns()
        oldest = self.checkpoints[0] if self.checkpoints else None
        newest = self.checkpoints[-1] if self.checkpoints else None
        covered = (now_ns - oldest.wall_ns) / 1e9 if oldest else 0.0
        untouched = [m.untouched() if m is not None else None for m in self.seeds]
        return {
            "journal_bytes": self.journal.size(),
            "journal_segments": len(self.journal.segments()),
            "history_s": self.history_s,
            "journal_max": self.journal_max,
            "history_covered_s": round(covered, 3),
            "history_short": self.short_history,
            "checkpoints": len(self.checkpoints),
            "oldest_checkpoint": oldest.to_json() if oldest else None,
            "newest_checkpoint": newest.to_json() if newest else None,
            "views_open": self.pins,
            "failover": self.failover,
            "disks": {d.name: {"size": d.size, "durable_gen": d.gen, "durable_seq": d.seq,
                               "applied_gen": d.applied_gen,
                               "applied_seq": d.applied_seq,
                               "newest_gen": head[i][0], "newest_seq": head[i][1],
                               "consistent": d.ever_consistent and not held,
                               "ever_consistent": d.ever_consistent,
                               "seed_untouched_chunks": untouched[i],
                               "replica": self.replica_path(d.name)}
                      for i, d in enumerate(self.disks)},
        }

    def close(self) -> None:
        with self._lock:
            self._checkpoint()
            for fd in self._fds:
                os.close(fd)
            self._fds = []
            self.journal.close()

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory)


def _sparse_copy(src: str, dest: str, size: int) -> None:
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
    _fsync_parent(dest)


def open_or_none(directory: str) -> Optional[Dict[str, Any]]:
    """The saved metadata of a group directory, if any."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta: Dict[str, Any] = json.load(f)
            return meta
    except FileNotFoundError:
        return None
