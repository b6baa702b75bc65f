"""A protection group on the target site: its journal, its replicas, and its state.

Theory of operation
-------------------
``accept`` takes a batch of records from the wire, checks all of them (disk, bounds,
sequence) before anything is written, appends the new ones to the journal (durable when it
returns: the caller may ack them), then lets the applier (``applier.py``) catch up under
the hold-back rule (``holdback.py``).

Group checkpoints arrive with a batch and are journaled after its records, as
``KIND_CHECKPOINT`` markers. The state of disk d at checkpoint C is the replica plus the
journaled records of d after the replica's point up to C's cut for d (``restore.py``); C is
available while the replica of every disk is not past its cut.

Sequence rules for a disk whose newest journaled record is (G, S): a record of a lower
generation, or of G with a sequence up to S, is a duplicate and dropped; (G, S+1) and
(G' > G, 1) are next; anything else is a gap and a protocol error.

A group's life::

    state        event       next
    opening      opened      receiving     (its meta.json has no failover record)
    opening      failover    failed-over   (it has one: finished again if a crash cut it)
    receiving    failover    failed-over
    receiving    close       closed
    failed-over  close       closed

Everything that changes the group runs in a worker thread with ``_lock`` held, and ends by
publishing a new status snapshot (``_publish``); ``status`` reads the snapshot and never
takes the lock, so a busy group never stalls the event loop that asks.
"""

from __future__ import annotations

import enum
import logging
import os
import shutil
import threading
import time
from dataclasses import dataclass, replace
from typing import Any, Dict, List, Optional, Tuple

from formats import jindex
from formats.durable import fsync_parent
from formats.records import KIND_CHECKPOINT, KIND_CONSISTENT, KIND_WRITE, MAP_KINDS, JRecord, Point

from ..checkpoints import Checkpoint, CheckpointError, choose
from ..errors import Conflict, NotFound
from ..protocol.frames import MAX_RECORD, ProtocolError
from . import applier, failover, meta
from . import seeds as seed
from .holdback import HoldBack
from .journal import KIND_SEEDED, SEGMENT_MAX, Journal, Position
from .restore import restore
from .transitions import Table

log = logging.getLogger("ferry.replica")

DEFAULT_HISTORY = 4 * 3600
DEFAULT_JOURNAL_MAX = 50 * 1024 ** 3


class SizeMismatch(Conflict):
    pass


class NoConsistentState(NotFound):
    pass


class GroupState(enum.Enum):
    OPENING = "opening"
    RECEIVING = "receiving"
    FAILED_OVER = "failed-over"
    CLOSED = "closed"


class GroupEvent(enum.Enum):
    OPENED = "opened"
    FAILOVER = "failover"
    CLOSE = "close"


LIFE = Table[GroupState, GroupEvent]("a target group", {
    (GroupState.OPENING, GroupEvent.OPENED): GroupState.RECEIVING,
    (GroupState.OPENING, GroupEvent.FAILOVER): GroupState.FAILED_OVER,
    (GroupState.RECEIVING, GroupEvent.FAILOVER): GroupState.FAILED_OVER,
    (GroupState.RECEIVING, GroupEvent.CLOSE): GroupState.CLOSED,
    (GroupState.FAILED_OVER, GroupEvent.CLOSE): GroupState.CLOSED,
})


@dataclass
class DiskState:
    name: str
    size: int
    gen: int = 0            # newest journaled record
    seq: int = 0
    applied_gen: int = 0    # newest record applied to the replica
    applied_seq: int = 0


def check_disks(name: str, held: List[Tuple[str, int]], sent: List[Tuple[str, int]]) -> None:
    """SizeMismatch unless the source sends the disks (names and sizes) held here."""
    if held != sent:
        raise SizeMismatch("group %s holds disks %s here; the source sent %s" % (
            name, ", ".join("%s (%d bytes)" % d for d in held),
            ", ".join("%s (%d bytes)" % d for d in sent)))


class TargetGroup:
    def __init__(self, directory: str, name: str, disks: List[Tuple[str, int]],
                 protection: Optional[str] = None, history_s: Optional[float] = None,
                 journal_max: Optional[int] = None, segment_max: int = SEGMENT_MAX,
                 saved: Optional[meta.Meta] = None) -> None:
        """Open (or create) the group's storage; ``disks`` are (name, size) in group order.

        ``protection`` identifies one protection of the group on the source; a new one
        (the group was unprotected and protected again) starts a new stream: the journal is
        dropped and the replicas wait for their initial sync, keeping their old content.
        ``saved`` is its meta.json when the caller read it already (``reopen``)."""
        self.directory = directory
        self.name = name
        self.state = GroupState.OPENING
        self._lock = threading.Lock()
        os.makedirs(os.path.join(directory, "replicas"), exist_ok=True)
        m = (saved if saved is not None else meta.load(directory)) or {}
        # Every check before anything changes: a refused group keeps all it had.
        if m.get("disks"):
            check_disks(name, meta.disks(m), list(disks))
        self.history_s = float(history_s if history_s is not None
                               else m.get("history_s", DEFAULT_HISTORY))
        self.journal_max = int(journal_max if journal_max is not None
                               else m.get("journal_max", DEFAULT_JOURNAL_MAX))
        self.tags: Dict[str, List[str]] = dict(m.get("tags", {}))
        self.failover: Optional[Dict[str, Any]] = m.get("failover")
        self.pins = 0            # open views and tests: nothing is promoted while > 0
        self.short_history = False  # the journal limit keeps less than history_s
        self.protection = m.get("protection") if protection is None else protection
        if m and self.protection != m.get("protection"):
            log.warning("group %s: a new protection replaces the old one; its replicas wait "
                        "for a full sync", name)
            shutil.rmtree(os.path.join(directory, "journal"), ignore_errors=True)
            shutil.rmtree(os.path.join(directory, "seeds"), ignore_errors=True)
            m = {"disks": [dict(d, applied_gen=0, applied_seq=0, ever_consistent=False)
                           for d in m.get("disks", [])]}
        known = {d["name"]: d for d in m.get("disks", [])}
        self.disks = [DiskState(dname, size) for dname, size in disks]
        for st in self.disks:
            old = known.get(st.name)
            if old is not None:
                st.applied_gen, st.applied_seq = old["applied_gen"], old["applied_seq"]
            st.gen, st.seq = st.applied_gen, st.applied_seq
        whole = [bool(known.get(st.name, {}).get("ever_consistent")) for st in self.disks]
        self.fds = [self._open_replica(st) for st in self.disks]
        # New directories and files must survive a crash too.
        fsync_parent(os.path.join(directory, "replicas", "x"))
        fsync_parent(directory)
        fsync_parent(os.path.join(directory, "replicas"))
        self.journal = Journal(os.path.join(directory, "journal"), segment_max,
                               self._segment_age())
        if self.journal.dropped_tail:
            log.warning("group %s: dropped a torn journal tail of %d bytes",
                        name, self.journal.dropped_tail)
        applied = m.get("applied")
        self.applied: Position = (applied[0], applied[1]) if applied else self.journal.start
        self.applied = max(self.applied, self.journal.start)
        self.since_checkpoint = 0
        # meta.json's applied position and the disks' points there (see save_meta), and
        # whether the journal holds records after it that a restart would apply again.
        self._meta_point: Optional[Tuple[Position, List[Point]]] = None
        self.whole_after_meta = False
        # A pre-seeded disk's seed lasts until its initial sync ends (seeds.py).
        self.seeds: List[Optional[seed.SeedMap]] = [
            None if w else seed.load(directory, st.name, st.size)
            for st, w in zip(self.disks, whole)]
        for st, sm in zip(self.disks, self.seeds):
            if sm is None:
                seed.drop(directory, st.name)
        self.checkpoints: List[Checkpoint] = []
        self._load_checkpoints()
        # Learn what the journal holds beyond the replicas: the applier starts there.
        self.gate = HoldBack(whole, [0] * len(self.disks))
        after = False
        for rec, _pos in self.journal.read_from(self.applied):
            if rec.kind >= KIND_CHECKPOINT:
                continue
            st = self.disks[rec.disk]
            st.gen, st.seq = rec.gen, rec.seq
            self.gate.journaled(rec.disk, rec.kind)
            after = after or rec.kind in MAP_KINDS
            self._seed_note(rec)
        self.save_meta(synced=True)  # the position it was loaded from
        self.whole_after_meta = after
        self._head = applier.Head(self)
        if self.failover is None:
            self._go(GroupEvent.OPENED)
            applier.promote(self)
        else:
            self._go(GroupEvent.FAILOVER)
            if failover.state_of(self.failover) is not failover.State.DONE:
                failover.finish(self)  # a crash stopped it half-way: do it again
        self._snapshot: Dict[str, Any] = {}
        self._publish()

    @classmethod
    def reopen(cls, directory: str, name: str) -> Optional[TargetGroup]:
        """The group a directory holds, as its meta.json says; None when it has none."""
        saved = meta.load(directory)
        if saved is None:
            return None
        return cls(directory, name, meta.disks(saved), protection=saved.get("protection"),
                   saved=saved)

    def _go(self, event: GroupEvent) -> None:
        self.state = LIFE.step(self.state, event)

    def _open_replica(self, st: DiskState) -> int:
        fd = os.open(self.replica_path(st.name), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        if os.fstat(fd).st_size != st.size:
            os.ftruncate(fd, st.size)
            os.fsync(fd)
        return fd

    # -- paths and metadata --------------------------------------------------------------

    def replica_path(self, disk: str) -> str:
        return os.path.join(self.directory, "replicas", disk + ".img")

    def _segment_age(self) -> float:
        """Segments close at this age, so the window is trimmed in steps of about 1/8."""
        return max(1.0, min(300.0, self.history_s / 8))

    def set_limits(self, history_s: float, journal_max: int) -> None:
        with self._lock:
            if (history_s, journal_max) != (self.history_s, self.journal_max):
                self.history_s, self.journal_max = float(history_s), int(journal_max)
                self.journal.segment_age = self._segment_age()
                self.save_meta()
            self._publish()

    def _load_checkpoints(self) -> None:
        for segno in self.journal.segments():
            for e in jindex.entries(self.journal.index(segno)):
                if e[1] == KIND_CHECKPOINT:
                    rec = self.journal.read_at(segno, e[8])
                    assert rec.data is not None
                    c = Checkpoint.decode(rec.data)
                    c.tags = self.tags.get(c.id, [])
                    self.checkpoints.append(c)

    def save_meta(self, synced: bool = False) -> None:
        """Write meta.json. Its applied position (where a restart re-applies the journal
        from) moves only with ``synced``: when the replicas hold everything before
        ``applied`` durably; other saves (tags, limits) keep the last synced one."""
        if synced or self._meta_point is None:
            self._meta_point = (self.applied,
                                [(d.applied_gen, d.applied_seq) for d in self.disks])
            self.whole_after_meta = False
        applied, points = self._meta_point
        meta.save(self.directory, {
            "group": self.name,
            "protection": self.protection,
            "history_s": self.history_s,
            "journal_max": self.journal_max,
            "tags": self.tags,
            "failover": self.failover,
            "applied": list(applied),
            "disks": [{"name": d.name, "size": d.size, "applied_gen": p[0],
                       "applied_seq": p[1], "ever_consistent": self.gate.whole(i)}
                      for i, (d, p) in enumerate(zip(self.disks, points))],
        })

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
            if self.state is not GroupState.RECEIVING:
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
                fresh = applier.apply_initial(self, fresh)
                if any(r.kind in MAP_KINDS for r in fresh):
                    self.whole_after_meta = True  # a restart would re-apply them
                self.journal.append(fresh + markers)
                for r in fresh:
                    st = self.disks[r.disk]
                    st.gen, st.seq = r.gen, r.seq
                    self.gate.journaled(r.disk, r.kind)
                    self._seed_note(r)
                self.checkpoints.extend(new_cps)
                self._head.appended(fresh)
                self._newest()
                applier.promote(self)
                self._publish()
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

    def _apply(self, stop: Optional[Position] = None) -> None:
        applier.apply(self, stop)

    def maintain(self) -> None:
        """Promote what aged out of the window (called now and then, not only on batches)."""
        with self._lock:
            if self.state is GroupState.RECEIVING:
                applier.promote(self)
            self._publish()

    def checkpoint(self) -> None:
        with self._lock:
            applier.checkpoint(self)
            self._publish()

    # -- reading -------------------------------------------------------------------------

    def _newest(self) -> Tuple[List[Point], bool]:
        """Each disk's newest point that is whole (where an applier with no window would
        stop), and whether a resync holds it back."""
        h = self._head
        if h.segno not in self.journal.segments():
            h = self._head = applier.Head(self)  # the applier deleted where it stood
        h.advance(self.journal)
        return list(h.points), h.held

    def index_of(self, disk: str) -> int:
        for i, st in enumerate(self.disks):
            if st.name == disk:
                return i
        raise CheckpointError("group %s has no disk %s (it has %s)"
                              % (self.name, disk, ", ".join(d.name for d in self.disks)))

    def point(self, ref: Optional[str] = None, at_wall_ns: Optional[int] = None
              ) -> Tuple[Optional[Checkpoint], List[Point], bool]:
        """The checkpoint chosen (None: the newest whole state), each disk's cut, and
        whether a resync holds the newest state back. Call with the lock held."""
        for i, st in enumerate(self.disks):
            if not self.gate.whole(i):
                raise NoConsistentState(
                    "disk %s of group %s has no consistent state yet: its initial sync has "
                    "not ended" % (st.name, self.name))
        if ref is None and at_wall_ns is None:
            points, held = self._newest()
            return None, points, held
        c = choose(self.checkpoints, ref, at_wall_ns)
        return c, list(c.cut), False

    def restore(self, disk: str, dest: str, ref: Optional[str] = None,
                at_wall_ns: Optional[int] = None) -> Dict[str, Any]:
        """Write ``disk`` as of a checkpoint (default: its newest consistent state) to the
        new file ``dest``; durable (data and name) when it returns (``restore.py``)."""
        with self._lock:
            return restore(self, disk, dest, ref, at_wall_ns)

    def view_spec(self, ref: Optional[str], at_wall_ns: Optional[int]
                  ) -> Tuple[Optional[Checkpoint], List[Dict[str, Any]]]:
        """Pin the group (no promotion) and describe each disk at a point for the view
        plugin (``nbd_plugin/view.py``). ``unpin`` when the view is closed."""
        with self._lock:
            c, cut, _held = self.point(ref, at_wall_ns)
            self.pins += 1
            self._publish()
            segments = [[segno, self.journal.path(segno), self.journal.segment_size(segno)]
                        for segno in self.journal.segments() if segno >= self.applied[0]]
            specs = []
            for i, st in enumerate(self.disks):
                specs.append({"replica": self.replica_path(st.name), "size": st.size,
                              "disk": i, "base": [st.applied_gen, st.applied_seq],
                              "upto": list(cut[i]), "start": list(self.applied),
                              "segments": segments})
            return c, specs

    def unpin(self) -> None:
        with self._lock:
            self.pins = max(0, self.pins - 1)
            self._publish()

    # -- failover, tags ------------------------------------------------------------------

    def failover_live(self, ref: Optional[str], at_wall_ns: Optional[int]) -> Dict[str, Any]:
        """Make the replicas the live disks as of a point (``failover.py``)."""
        with self._lock:
            try:
                return failover.live(self, ref, at_wall_ns)
            finally:
                self._publish()

    def failed_over(self, record: Dict[str, Any]) -> None:
        """The group takes no more changes: ``record`` is its failover (failover.py)."""
        self._go(GroupEvent.FAILOVER)
        self.failover = record

    def add_tag(self, cid: str, tag: str) -> None:
        with self._lock:
            tags = self.tags.setdefault(cid, [])
            if tag not in tags:
                tags.append(tag)
                for c in self.checkpoints:
                    if c.id == cid:
                        c.tags = tags
                self.save_meta()
            self._publish()

    def list_checkpoints(self) -> List[Dict[str, Any]]:
        with self._lock:
            return [c.to_json() for c in self.checkpoints]

    # -- status --------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """The group's status as of its last change (never waits for the lock: it is
        asked from the agent's event loop)."""
        snap = self._snapshot
        out = dict(snap)
        oldest = snap["oldest_checkpoint"]
        out["history_covered_s"] = round((time.time_ns() - oldest["wall_ns"]) / 1e9, 3) \
            if oldest else 0.0
        out["disks"] = {k: dict(v) for k, v in snap["disks"].items()}
        return out

    def _publish(self) -> None:
        """A new status snapshot, as things stand (call with the lock held)."""
        head, held = self._newest()
        oldest = self.checkpoints[0] if self.checkpoints else None
        newest = self.checkpoints[-1] if self.checkpoints else None
        untouched = [m.untouched() if m is not None else None for m in self.seeds]
        self._snapshot = {
            "journal_bytes": self.journal.size(),
            "journal_segments": len(self.journal.segments()),
            "history_s": self.history_s,
            "journal_max": self.journal_max,
            "history_covered_s": 0.0,  # from oldest_checkpoint when read
            "history_short": self.short_history,
            "checkpoints": len(self.checkpoints),
            "oldest_checkpoint": oldest.to_json() if oldest else None,
            "newest_checkpoint": newest.to_json() if newest else None,
            "views_open": self.pins,
            "failover": dict(self.failover) if self.failover is not None else None,
            "disks": {d.name: {"size": d.size, "durable_gen": d.gen, "durable_seq": d.seq,
                               "applied_gen": d.applied_gen,
                               "applied_seq": d.applied_seq,
                               "newest_gen": head[i][0], "newest_seq": head[i][1],
                               "consistent": self.gate.whole(i) and not held,
                               "ever_consistent": self.gate.whole(i),
                               "seed_untouched_chunks": untouched[i],
                               "replica": self.replica_path(d.name)}
                      for i, d in enumerate(self.disks)},
        }

    def close(self) -> None:
        with self._lock:
            if self.state is GroupState.CLOSED:
                return
            applier.checkpoint(self)
            for fd in self.fds:
                os.close(fd)
            self.fds = []
            self.journal.close()
            self._go(GroupEvent.CLOSE)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory)
