"""The applier of a target group: journal records into the replica files, in journal order.

Theory of operation
-------------------
The applier copies journal records, in journal order, to the replica files, under the
hold-back rule (``holdback.py``), so a replica is always a crash-consistent state of its
disk, the newest one known to be whole.

The replica holds the oldest point of the group's history. Once every disk has been whole
once, the applier (the *promoter*) only applies closed segments that have left the history
window (``history_s``, by the segment file's time of last append) or that the journal must
shed to stay under ``journal_max`` bytes; before that (an initial sync is running, there is
no point in time to keep) it applies everything as it comes. While a view or a test
failover reads a group, nothing is promoted.

During the initial sync of a disk (it was never whole, nothing before it is waiting to be
applied, no view pins the group, it has no seed) there is no history to keep, so ``accept``
writes that disk's changes straight to its replica (``apply_initial``), in stream order,
fdatasyncs it, and only then journals them as ``KIND_APPLIED`` records: the header without
the data. Site B writes each byte once instead of twice. Before the first such write after
records journaled whole, a checkpoint makes those durable in the replica and moves
meta.json's position past them, so a restart never re-applies an older change on top of a
newer one. A crash between the replica's fdatasync and the journal's leaves the replica
ahead of the journal with changes that were never acked; the source sends them again, and
every range it owes is written again before the disk's ``consistent`` marker, so no state
that mixes them is ever offered. The disk's own ``consistent`` marker ends this: from there
on its changes are journaled whole.

Every ``CHECKPOINT_BYTES`` applied, after a promotion, and on close, the replicas are
fdatasynced, then ``meta.json`` records the journal position applied so far (atomic
replace), then whole segments before it are deleted. A crash between those steps re-applies
records from the last recorded position, which is harmless: applying a record twice in order
gives the same bytes.

Every function here is called with the group's lock held.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import List, Optional, Tuple

from formats import jindex
from formats.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from formats.durable import pwrite_all
from formats.records import (
    KIND_APPLIED,
    KIND_CHECKPOINT,
    KIND_CONSISTENT,
    KIND_WRITE,
    MAP_KINDS,
    JRecord,
    Point,
)

from . import aio
from .journal import Journal, JournalCorrupt, Position, named
from .state import GroupData

log = logging.getLogger("ferry.replica")

CHECKPOINT_BYTES = 256 * 1024 * 1024


class Head:
    """Where an applier with no window would stop: each disk's newest whole point.

    Kept incrementally (status asks often, and the journal can hold millions of records):
    it scans index entries once, from the replicas' point, under its own copy of the
    hold-back rule."""

    def __init__(self, g: GroupData) -> None:
        self.segno, self.i = g.applied[0], -1  # -1: find the first entry at applied
        self.offset = g.applied[1]
        self.points: List[Point] = [(d.applied_gen, d.applied_seq) for d in g.disks]
        self.rule = g.gate.copy()  # as the applier stands; its pending markers are ours
        self.held = False

    def appended(self, records: List[JRecord]) -> None:
        for r in records:
            self.rule.journaled(r.disk, r.kind)

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
                    if not self.rule.admit(disk, kind, flags):
                        self.held = True
                        return
                    self.points[disk] = (gen, seq)
                self.i += 1
            self.held = False
            later = [s for s in segments if s > self.segno]
            if not later:
                return
            self.segno, self.i, self.offset = later[0], 0, 0


def write_record(fd: int, rec: JRecord) -> None:
    """A change record onto a replica (durability is the caller's fdatasync)."""
    if rec.kind == KIND_WRITE:
        assert rec.data is not None
        pwrite_all(fd, rec.data, rec.offset)
    elif rec.length:
        fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, rec.offset, rec.length)


def queue_record(w: aio.Writer, rec: JRecord) -> None:
    """A change record onto a replica through its writer (complete after ``w.drain()``,
    durable after ``w.sync()``); an OSError names the file and the offset."""
    if rec.kind == KIND_WRITE:
        assert rec.data is not None
        w.pwrite(rec.data, rec.offset)
    else:
        w.punch(rec.offset, rec.length)


def noted(g: GroupData, rec: JRecord) -> None:
    """The chunks a change record wrote lose their digest until the next sync; a write's
    own data gives the digest of each chunk it covers whole (no read-back)."""
    if rec.kind == KIND_WRITE and rec.data is not None:
        g.digests[rec.disk].written(rec.offset, rec.data)
    else:
        g.digests[rec.disk].touched(rec.offset, rec.length)


def drain_replicas(g: GroupData) -> None:
    """Every replica write given has completed (nothing in flight when the lock is let
    go: readers of the replicas go through the page cache)."""
    first: Optional[OSError] = None
    for i, w in enumerate(g.writers):
        try:
            w.drain()
        except OSError as e:
            first = first or named(e, g.replica_path(g.disks[i].name))
    if first is not None:
        raise first


def drain_quietly(g: GroupData) -> None:
    """After an error: nothing left in flight; the writes' own errors are dropped (the
    first error is the one raised, and the writes are made again from the journal)."""
    for w in g.writers:
        try:
            w.drain()
        except OSError:
            pass


def sync_replicas(g: GroupData, disks: Optional[List[int]] = None) -> None:
    """fdatasync replicas (their writes drained first) and bring their digests up to
    date; an OSError names the file."""
    for i in range(len(g.fds)) if disks is None else disks:
        try:
            g.writers[i].sync()
            g.digests[i].update(g.fds[i])
        except OSError as e:
            drain_quietly(g)
            raise named(e, g.replica_path(g.disks[i].name)) from None


def apply_initial(g: GroupData, records: List[JRecord]) -> List[JRecord]:
    """Write the changes of disks in their initial sync straight to their replicas
    (durable when it returns) and give them back as KIND_APPLIED records; the others
    as they were (see the module)."""
    if g.pins or g.failover is not None or g.applied != g.journal.end:
        return records
    direct = {i for i, m in enumerate(g.seeds)
              if not g.gate.whole(i) and not g.gate.pending[i] and m is None}
    if not direct:
        return records
    if g.whole_after_meta:
        # A restart would re-apply the journal from meta.json's position, and records
        # journaled whole since then would land on top of what goes straight to the
        # replicas now: make them durable and move that position to the journal's end.
        checkpoint(g)
        if g.applied != g.journal.end or g.whole_after_meta:
            return records
    # The hold-back rule, followed through the batch: from a record it would hold back
    # on, the rest waits in the journal as usual, in journal order.
    rule = g.gate.copy()
    for r in records:
        rule.journaled(r.disk, r.kind)
    out: List[JRecord] = []
    written = set()
    for n, r in enumerate(records):
        if not rule.admit(r.disk, r.kind, r.flags):
            out.extend(records[n:])
            break
        if r.kind == KIND_CONSISTENT:
            direct.discard(r.disk)  # whole from here: its changes keep their data
        elif r.disk in direct and r.kind in MAP_KINDS:
            try:
                queue_record(g.writers[r.disk], r)
            except OSError:
                drain_quietly(g)
                raise
            noted(g, r)
            written.add(r.disk)
            r = replace(r, kind=KIND_APPLIED, data=None)
        out.append(r)
    sync_replicas(g, sorted(written))
    return out


def apply(g: GroupData, stop: Optional[Position] = None) -> None:
    """Apply the journal from the replicas' point to ``stop`` (default: its end), as far
    as the hold-back rule lets it."""
    pos = g.applied
    skip, stop = passable(g, pos, stop)
    try:
        pos = _apply_records(g, pos, stop, skip)
    except JournalCorrupt as e:
        # Promotion stops before the damage (the group shows it, journal-damaged);
        # what the records before it applied stays, the rest waits for the repair.
        log.debug("group %s: promotion stops: %s", g.name, e)
        pos = max(g.applied, e.position) if e.position is not None else g.applied
    except BaseException:
        drain_quietly(g)
        raise
    drain_replicas(g)  # a write that failed raises here: ``applied`` stays where it was
    # A checkpoint at a segment's end moved ``applied`` on to the next segment and
    # dropped this one: never step back onto it.
    g.applied = max(g.applied, pos)


def passable(g: GroupData, pos: Position, stop: Optional[Position]
             ) -> Tuple[Tuple[Tuple[int, int], ...], Optional[Position]]:
    """The damage after ``pos`` the applier may pass over, and where it must then stop.

    Damage is passed only once it is repaired (``damage.Mend``) and the newest whole state
    is past its repair, and then in one step up to its ``repaired_at`` at least: the
    replica never holds a state in the gap, without the damaged record and without all of
    what covers it."""
    skip: List[Tuple[int, int]] = []
    newest: Optional[List[Point]] = None
    for d in g.journal.damage:
        if d.key() < pos:
            continue
        if d.repaired_at is None:
            break  # nothing after it can be reached
        if newest is None:
            newest = g.newest()[0]
        if not d.covers(newest):
            break
        skip.append(d.key())
        at = (d.repaired_at[0], d.repaired_at[1])
        if stop is not None and d.key() < stop < at:
            stop = at
    return tuple(skip), stop


def _apply_records(g: GroupData, pos: Position, stop: Optional[Position],
                   skip: Tuple[Tuple[int, int], ...] = ()) -> Position:
    """Apply records from ``pos``; the position after the last one applied. Raises
    JournalCorrupt (its ``position``: after the last applied) at damage."""
    reader = g.journal.read_from(pos, stop, skip)
    while True:
        try:
            item = next(reader, None)
        except JournalCorrupt as e:
            e.position = pos
            raise
        if item is None:
            return pos
        rec, after = item
        if rec.kind >= KIND_CHECKPOINT:
            pos = after
            continue
        st = g.disks[rec.disk]
        was_held = g.gate.held(rec.disk)
        if not g.gate.admit(rec.disk, rec.kind, rec.flags):
            if not was_held:
                log.info("group %s: disk %s is resyncing; its replica stays at %d/%d "
                         "until the resync ends", g.name, st.name, st.applied_gen,
                         st.applied_seq)
            return pos
        if rec.kind in MAP_KINDS:
            try:
                queue_record(g.writers[rec.disk], rec)
            except OSError as e:
                raise named(e, g.replica_path(st.name)) from None
            noted(g, rec)
            g.since_checkpoint += rec.length if rec.kind == KIND_WRITE else 0
        elif rec.kind == KIND_APPLIED:
            g.since_checkpoint += rec.length  # in the replica already
        st.applied_gen, st.applied_seq = rec.gen, rec.seq
        pos = after
        if g.since_checkpoint >= CHECKPOINT_BYTES:
            drain_replicas(g)  # a failed write raises before ``applied`` moves past it
            g.applied = pos
            checkpoint(g)


def checkpoint(g: GroupData) -> None:
    """Replicas fdatasynced, then meta.json's position moved, then whole segments before
    it deleted (see the module)."""
    if g.failover is not None:
        return  # the replicas are live disks now: nothing moves in the journal
    sync_replicas(g)
    g.seeds.save()
    segments = g.journal.segments()
    if g.applied[0] != segments[-1] and \
            g.applied[1] >= g.journal.segment_size(g.applied[0]):
        # A whole segment applied: start at the next one, so this one can go.
        g.applied = (segments[segments.index(g.applied[0]) + 1], 0)
    g.save_meta(synced=True)
    g.journal.drop_before(g.applied[0])
    g.since_checkpoint = 0
    before = len(g.checkpoints)
    g.checkpoints = [c for c in g.checkpoints
                     if all((d.applied_gen, d.applied_seq) <= cut
                            for d, cut in zip(g.disks, c.cut))]
    if len(g.checkpoints) != before:
        log.debug("group %s: %d checkpoints left the window", g.name,
                  before - len(g.checkpoints))


def eager(g: GroupData) -> bool:
    """Before every disk was whole once there is no point in time worth keeping."""
    return not all(g.gate.whole(i) for i in range(len(g.disks)))


def promote(g: GroupData) -> None:
    """Apply what leaves the window or passes the journal's limit (see the module)."""
    if g.pins:
        return
    if eager(g):
        apply(g)
        if eager(g):
            return
        checkpoint(g)  # the first whole state: history starts here
        return
    segments = g.journal.segments()
    total = g.journal.size()
    now = time.time()
    limit = g.applied
    over_limit = False   # a segment inside the window goes for the limit
    aged_out = False     # a segment goes because it left the window
    for segno in segments:
        if segno < g.applied[0]:
            continue
        old = g.journal.segment_mtime(segno) < now - g.history_s
        over = total > g.journal_max
        if not (old or over):
            break
        if segno == segments[-1]:
            if not over or g.journal.segment_size(segno) == 0:
                break
            g.journal.rotate()  # the limit needs even the newest records applied
            segments = g.journal.segments()
        over_limit = over_limit or not old
        aged_out = aged_out or old
        limit = (segments[segments.index(segno) + 1], 0)
        total -= g.journal.segment_size(segno)
    short = True if over_limit else (False if aged_out else g.short_history)
    if short != g.short_history:
        g.short_history = short
        if short:
            log.warning("group %s: ALERT: the journal reached its limit of %d bytes; it "
                        "keeps less than the configured history of %g s", g.name,
                        g.journal_max, g.history_s)
        else:
            log.info("group %s: the journal keeps the configured history again", g.name)
    if limit > g.applied:
        before = g.applied
        apply(g, limit)
        if g.applied != before:  # a resync's hold-back may stop it where it was
            checkpoint(g)
