"""A protection group on the target site: its journal, its replicas, and its state.

Theory of operation
-------------------
``accept`` takes a batch of records from the wire, checks all of them (disk, bounds,
sequence: ``admission.py``) before anything is written, appends the new ones to the journal
(durable when it returns: the caller may ack them), then lets the applier (``applier.py``)
catch up under the hold-back rule (``holdback.py``).

Group checkpoints arrive with a batch and are journaled after its records, as
``KIND_CHECKPOINT`` markers. The state of disk d at checkpoint C is the replica plus the
journaled records of d after the replica's point up to C's cut for d (``restore.py``); C is
available while the replica of every disk is not past its cut.

A group's life::

    state        event       next
    opening          opened      receiving     (its meta.json has no failover record)
    opening          failover    failed-over   (it has one: finished again if a crash cut it)
    receiving        damaged     journal-damaged
    receiving        failover    failed-over
    receiving        close       closed
    journal-damaged  damaged     journal-damaged
    journal-damaged  repaired    receiving     (every damage covered again: damage.Mend)
    journal-damaged  failover    failed-over
    journal-damaged  close       closed
    failed-over      damaged     failed-over
    failed-over      rollback    receiving     (failover.py: its live disks deleted)
    failed-over      close       closed

A journal-damaged group (``journal.py``: records that fail their checks, found at open or
when read) still takes batches and promotes up to the damage; the points that need the
damaged records are refused (``point``), older ones restore. The ranges the damaged records
covered are asked of the source again (``asks``, sent by the server with an ACK); once
records journaled after the damage cover them (``damage.Mend``), the damage is repaired:
points past the covering records restore again, promotion passes over it (``applier``),
and the points between stay refused, a visible gap in history.

Everything that changes the group runs in a worker thread with ``_lock`` held, and ends by
publishing a new status snapshot (``status.py``); ``status`` reads the snapshot and never
takes the lock, so a busy group never stalls the event loop that asks.

This module passes 400 lines because opening a group (meta.json, replicas, journal and seeds
reconciled, in that order, before anything changes) is one sequence best read in one place;
the rules it follows live in the modules named above.
"""

from __future__ import annotations

import enum
import errno
import logging
import os
import shutil
import stat
import threading
import time
from typing import Any, Dict, List, Optional, Set, Tuple

import xxhash

from formats import jindex, reads
from formats.durable import fsync_parent
from formats.images import RAW
from formats.records import KIND_CHECKPOINT, MAP_KINDS, JRecord, Point

from ..checkpoints import Checkpoint, CheckpointError, choose
from ..errors import Conflict, NotFound, StorageError
from ..protocol.frames import ProtocolError
from . import admission, aio, applier, failover, mending, meta, status, wrappers
from . import reserve as _reserve
from . import seeds as seed
from .digests import ChunkDamaged, ReplicaDigests, digests_path
from .holdback import HoldBack
from .journal import SEGMENT_MAX, Journal, JournalCorrupt, Position
from .restore import check_replica, entries_from, restore
from .state import DiskState
from .transitions import Table

log = logging.getLogger("ferry.replica")

# Where this Python has xxhash: the view plugin (another Python) may use it to check records.
_XXHASH_PATH = os.path.dirname(os.path.dirname(os.path.abspath(xxhash.__file__)))

DEFAULT_HISTORY = 4 * 3600
DEFAULT_JOURNAL_MAX = 50 * 1024 ** 3


class SizeMismatch(Conflict):
    pass


class NoConsistentState(NotFound):
    pass


class GroupState(enum.Enum):
    OPENING = "opening"
    RECEIVING = "receiving"
    JOURNAL_DAMAGED = "journal-damaged"
    FAILED_OVER = "failed-over"
    CLOSED = "closed"


class GroupEvent(enum.Enum):
    OPENED = "opened"
    FAILOVER = "failover"
    DAMAGED = "damaged"
    REPAIRED = "repaired"
    ROLLBACK = "rollback"
    CLOSE = "close"


LIFE = Table[GroupState, GroupEvent]("a target group", {
    (GroupState.OPENING, GroupEvent.OPENED): GroupState.RECEIVING,
    (GroupState.OPENING, GroupEvent.FAILOVER): GroupState.FAILED_OVER,
    (GroupState.RECEIVING, GroupEvent.FAILOVER): GroupState.FAILED_OVER,
    (GroupState.RECEIVING, GroupEvent.CLOSE): GroupState.CLOSED,
    (GroupState.RECEIVING, GroupEvent.DAMAGED): GroupState.JOURNAL_DAMAGED,
    (GroupState.JOURNAL_DAMAGED, GroupEvent.DAMAGED): GroupState.JOURNAL_DAMAGED,
    (GroupState.JOURNAL_DAMAGED, GroupEvent.REPAIRED): GroupState.RECEIVING,
    (GroupState.JOURNAL_DAMAGED, GroupEvent.FAILOVER): GroupState.FAILED_OVER,
    (GroupState.JOURNAL_DAMAGED, GroupEvent.CLOSE): GroupState.CLOSED,
    (GroupState.FAILED_OVER, GroupEvent.DAMAGED): GroupState.FAILED_OVER,
    (GroupState.FAILED_OVER, GroupEvent.ROLLBACK): GroupState.RECEIVING,
    (GroupState.FAILED_OVER, GroupEvent.CLOSE): GroupState.CLOSED,
})


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
                 saved: Optional[meta.Meta] = None, pins: int = 0) -> None:
        """Open (or create) the group's storage; ``disks`` are (name, size) in group order.

        ``protection`` identifies one protection of the group on the source; a new one
        (the group was unprotected and protected again) starts a new stream: the journal is
        dropped and the replicas wait for their initial sync, keeping their old content.
        ``saved`` is its meta.json when the caller read it already (``reopen``); ``pins``
        the views an earlier agent left serving (nothing is promoted under them)."""
        self.directory = directory
        self.name = name
        self.state = GroupState.OPENING
        self._reported: Set[Tuple[int, int]] = set()  # damage logged (segment, offset)
        self.storage_error: Optional[Dict[str, Any]] = None  # the last, until a batch works
        self.mending = mending.Mending()  # damage and its repair
        self._lock = threading.Lock()
        os.makedirs(os.path.join(directory, "replicas"), exist_ok=True)
        m = (saved if saved is not None else meta.load(directory)) or {}
        # Every check before anything changes: a refused group keeps all it had.
        if m.get("disks"):
            check_disks(name, meta.disks(m), list(disks))
        m = self._settings(m, protection, history_s, journal_max)
        self.pins = pins
        whole = self._open_replicas(m, disks)
        self._make_images()
        self.journal = Journal(os.path.join(directory, "journal"), segment_max,
                               self._segment_age(), name, [st.name for st in self.disks])
        if self.journal_reserve:  # kept as far as the file system gives (reopen)
            self.journal.set_reserve(self._reserve(), strict=False)
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
        self.seeds = seed.GroupSeeds(directory, disks, whole)
        self.checkpoints = self._load_checkpoints()
        self.gate = HoldBack(whole, [0] * len(self.disks))
        self.whole_after_meta = self._scan_unapplied()
        self._head = applier.Head(self)
        if self.failover is not None:
            failover.resume(self)  # a crash stopped a step half-way: do it again
        if self.failover is None:
            self._go(GroupEvent.OPENED)
            self._mend()
            applier.promote(self)
        else:
            self._go(GroupEvent.FAILOVER)
        self._snapshot: status.Snapshot = {}
        self._publish()

    def _settings(self, m: meta.Meta, protection: Optional[str], history_s: Optional[float],
                  journal_max: Optional[int]) -> meta.Meta:
        """The group's settings from its meta.json and the caller; the meta.json to open
        from (a new protection forgets the journal and the replicas' points)."""
        self.history_s = float(history_s if history_s is not None
                               else m.get("history_s", DEFAULT_HISTORY))
        self.journal_max = int(journal_max if journal_max is not None
                               else m.get("journal_max", DEFAULT_JOURNAL_MAX))
        self.tags: Dict[str, List[str]] = dict(m.get("tags", {}))
        self.journal_reserve = bool(m.get("journal_reserve"))  # set_reserve
        self.replica_format = str(m.get("replica_format", RAW))  # set_replica_format
        self.image_errors: Dict[str, str] = {}  # disk -> why its image is not made
        self.failover: Optional[Dict[str, Any]] = m.get("failover")
        self.pins = 0            # open views and tests: nothing is promoted while > 0
        self.short_history = False  # the journal limit keeps less than history_s
        self.protection = m.get("protection") if protection is None else protection
        # A rebuilt meta.json (meta.rebuild) does not know the protection: the first
        # session's is taken as this group's.
        self.rebuilt = bool(m.get("rebuilt")) and protection is None
        if m and self.protection != m.get("protection") and not m.get("rebuilt"):
            log.warning("group %s: a new protection replaces the old one; its replicas wait "
                        "for a full sync", self.name)
            shutil.rmtree(os.path.join(self.directory, "journal"), ignore_errors=True)
            shutil.rmtree(os.path.join(self.directory, "seeds"), ignore_errors=True)
            self.journal_reserve = False
            m = {"disks": [dict(d, applied_gen=0, applied_seq=0, ever_consistent=False)
                           for d in m.get("disks", [])]}
        return m

    def _open_replicas(self, m: meta.Meta, disks: List[Tuple[str, int]]) -> List[bool]:
        """The disks' states and replica files as meta.json left them (durable, names
        too); whether each disk has been whole once."""
        known = {d["name"]: d for d in m.get("disks", [])}
        self.disks = [DiskState(dname, size) for dname, size in disks]
        for st in self.disks:
            old = known.get(st.name)
            if old is not None:
                st.applied_gen, st.applied_seq = old["applied_gen"], old["applied_seq"]
                st.grown = [(int(g), int(q), int(n)) for g, q, n in old.get("grown", [])]
            st.gen, st.seq = st.applied_gen, st.applied_seq
        whole = [bool(known.get(st.name, {}).get("ever_consistent")) for st in self.disks]
        self.fds = [self._open_replica(st) for st in self.disks]
        self.writers = [aio.open_writer(fd, self.replica_path(st.name))
                        for fd, st in zip(self.fds, self.disks)]
        self.digests = [ReplicaDigests(digests_path(self.replica_path(st.name)), st.size)
                        for st in self.disks]
        # New directories and files must survive a crash too.
        fsync_parent(os.path.join(self.directory, "replicas", "x"))
        fsync_parent(self.directory)
        fsync_parent(os.path.join(self.directory, "replicas"))
        return whole

    def _scan_unapplied(self) -> bool:
        """Learn what the journal holds beyond the replicas (the applier starts there),
        save meta.json at the position it was loaded from, and say whether a restart
        would apply changes again."""
        after = False
        self.journal.verify(self.applied)  # damage is recorded, the records stay out
        for _segno, e in entries_from(self.journal, self.applied):
            disk, kind, _f, gen, length, seq, offset = e[:7]
            if kind >= KIND_CHECKPOINT:
                continue
            st = self.disks[disk]
            st.gen, st.seq = gen, seq
            self.gate.journaled(disk, kind)
            after = after or kind in MAP_KINDS
            self.seeds.note(disk, kind, offset, length)
        self.save_meta(synced=True)
        return after

    @classmethod
    def reopen(cls, directory: str, name: str, pins: int = 0) -> Optional[TargetGroup]:
        """The group a directory holds, as its meta.json says; None when it has none."""
        saved = meta.load(directory)
        if saved is None:
            return None
        return cls(directory, name, meta.disks(saved), protection=saved.get("protection"),
                   saved=saved, pins=pins)

    def _go(self, event: GroupEvent) -> None:
        self.state = LIFE.step(self.state, event)

    def _open_replica(self, st: DiskState) -> int:
        path = self.replica_path(st.name)
        flags = os.O_RDWR | os.O_CLOEXEC
        if os.path.islink(path):
            # Only this agent makes links in its own replicas/ (a failback adopts an original
            # disk in place, failback.py): followed to an existing regular file or block
            # device, never created through.
            real = os.path.realpath(path)
            fd = os.open(real, flags | os.O_NOFOLLOW)
            mode = os.fstat(fd).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
                os.close(fd)
                raise OSError(errno.EINVAL, "not a regular file or block device", path)
        else:
            fd = os.open(path, flags | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        if stat.S_ISREG(os.fstat(fd).st_mode) and os.fstat(fd).st_size != st.size:
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

    def _reserve(self) -> _reserve.Reserve:
        return _reserve.Reserve(self.name, os.path.join(self.directory, "journal"),
                                self.journal_max)

    def set_reserve(self) -> None:
        """Preallocate the journal's space for the group's limit (``--journal-reserve``);
        ReserveError (nothing new allocated) when the file system cannot hold it."""
        with self._lock:
            # A group that has its reserve takes back what it lost as far as it goes.
            self.journal.set_reserve(self._reserve(), strict=not self.journal_reserve)
            if not self.journal_reserve:
                self.journal_reserve = True
                self.save_meta()
            self._publish()

    def set_replica_format(self, fmt: str) -> None:
        """Keep the replicas in ``fmt`` too (``protect --replica-format``, wrappers.py):
        an image of that format over each raw replica, and none of another."""
        with self._lock:
            if fmt != self.replica_format:
                self.replica_format = fmt
                self.save_meta()
                self._make_images()
            self._publish()

    def _make_images(self) -> None:
        """Never fails the group: what could not be made is named in its status."""
        try:
            self.image_errors = wrappers.ensure(os.path.join(self.directory, "replicas"),
                                                [(d.name, d.size) for d in self.disks],
                                                self.replica_format)
        except OSError as e:
            log.error("group %s: its replicas' %s images: %s", self.name,
                      self.replica_format, e)
            self.image_errors = {d.name: "its %s image cannot be made: %s" % (
                self.replica_format, e) for d in self.disks}

    def image_path(self, disk: str) -> str:
        """The file disk's replica is opened as in the group's replica format."""
        return wrappers.image_path(os.path.join(self.directory, "replicas"), disk,
                                   self.replica_format)

    def _load_checkpoints(self) -> List[Checkpoint]:
        out = []
        for segno in self.journal.segments():
            for e in jindex.entries(self.journal.index(segno)):
                if e[1] == KIND_CHECKPOINT:
                    try:
                        rec = self.journal.read_at(segno, e[8])
                    except JournalCorrupt:
                        continue  # recorded as damage; the checkpoint is lost
                    assert rec.data is not None
                    c = Checkpoint.decode(rec.data)
                    c.tags = self.tags.get(c.id, [])
                    # Only those the replicas are not past (a replica applied to the middle
                    # of a segment: a promotion past repaired damage, a rebuilt meta.json).
                    if all((d.applied_gen, d.applied_seq) <= tuple(cut)
                           for d, cut in zip(self.disks, c.cut)):
                        out.append(c)
        return out

    def save_meta(self, synced: bool = False) -> None:
        """Write meta.json. Its applied position (where a restart re-applies the journal
        from) moves only with ``synced``: when the replicas hold everything before
        ``applied`` durably; other saves (tags, limits) keep the last synced one."""
        if synced or self._meta_point is None:
            self._meta_point = (self.applied,
                                [(d.applied_gen, d.applied_seq) for d in self.disks])
            self.whole_after_meta = False
        applied, points = self._meta_point
        doc = {
            "group": self.name,
            "protection": self.protection,
            "history_s": self.history_s,
            "journal_max": self.journal_max,
            **({"journal_reserve": True} if self.journal_reserve else {}),
            **({"replica_format": self.replica_format} if self.replica_format != RAW
               else {}),
            "tags": self.tags,
            "failover": self.failover,
            **({"rebuilt": True} if self.rebuilt else {}),
            "applied": list(applied),
            "disks": [{"name": d.name, "size": d.size, "applied_gen": p[0],
                       "applied_seq": p[1], "ever_consistent": self.gate.whole(i),
                       **({"grown": [list(x) for x in d.grown]} if d.grown else {})}
                      for i, (d, p) in enumerate(zip(self.disks, points))],
        }
        if self.journal.reserve is not None:  # meta.json.tmp needs free blocks: the room's
            self.journal.reserve.room_for(lambda: meta.save(self.directory, doc), 256 * 1024)
        else:
            meta.save(self.directory, doc)

    def grows(self, disks: List[Tuple[str, int]]) -> bool:
        """Whether the source sends these disks grown (none smaller, one larger)."""
        held = [(d.name, d.size) for d in self.disks]
        return [n for n, _ in held] == [n for n, _ in disks] and held != list(disks) \
            and all(new >= old for (_, old), (_, new) in zip(held, disks))

    def grow(self, disks: List[Tuple[str, int]]) -> None:
        """Take the source's disks grown (``source/resize.py``): each replica extended
        (durable), the point before the growth remembered with the old size (``size_at``),
        meta.json saved. The new tail reads as zeros until the source's sync of it lands."""
        with self._lock:
            if not self.grows(disks) or self.failover is not None:
                return
            for i, (st, (_name, size)) in enumerate(zip(self.disks, disks)):
                if size == st.size:
                    continue
                fd = self.fds[i]
                if stat.S_ISREG(os.fstat(fd).st_mode):
                    os.ftruncate(fd, size)
                    os.fsync(fd)
                elif os.lseek(fd, 0, os.SEEK_END) < size:
                    raise SizeMismatch(
                        "group %s disk %s: the source's disk grew to %d bytes; the replica "
                        "%s is a device of %d bytes: grow it first" % (
                            self.name, st.name, size, self.replica_path(st.name),
                            os.lseek(fd, 0, os.SEEK_END)))
                log.warning("group %s disk %s grew from %d to %d bytes", self.name, st.name,
                            st.size, size)
                st.grown.append((st.gen, st.seq, st.size))
                st.size = size
                self.digests[i] = ReplicaDigests(digests_path(self.replica_path(st.name)),
                                                 size)
            self.save_meta()
            self._make_images()
            self._publish()

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
            if self.state not in (GroupState.RECEIVING, GroupState.JOURNAL_DAMAGED):
                raise ProtocolError("group %s %s here; it takes no more changes" % (
                    self.name, "failed over" if self.failover is not None else "is closed"))
            try:
                out = self._accept(records, checkpoints, clocks)
            except OSError as e:
                self._storage_failed(e)
                raise
            if self.storage_error is not None:
                log.warning("group %s: storage works again (after %s)", self.name,
                            self.storage_error["error"])
                self.storage_error = None
                self._publish()
            return out

    def _storage_failed(self, e: OSError) -> None:
        """B's storage failed under this group: status says where (file, errno)."""
        first = self.storage_error is None
        self.storage_error = {"error": "%s: %s" % (e.filename or "?", e.strerror or e),
                              "file": e.filename, "errno": e.errno,
                              "errno_name": errno.errorcode.get(e.errno or 0),
                              "since": (self.storage_error or {}).get("since", time.time())}
        if first:
            log.error("group %s: storage error: %s", self.name, self.storage_error["error"])
        self._publish()

    def _accept(self, records: List[JRecord], checkpoints: Optional[List[Checkpoint]],
                clocks: Optional[Tuple[int, int]]) -> Tuple[int, List[str]]:
        """Check, journal and promote (with the lock held; see accept)."""
        fresh = admission.fresh(self.name, self.disks, self.seeds, records)
        new_cps, ids = admission.new_checkpoints(self.disks, fresh, self.checkpoints,
                                                 checkpoints or [], clocks)
        markers = [admission.marker(c) for c in new_cps]
        if fresh or markers:
            fresh = applier.apply_initial(self, fresh)
            if any(r.kind in MAP_KINDS for r in fresh):
                self.whole_after_meta = True  # a restart would re-apply them
            self.journal.append(fresh + markers)
            for r in fresh:
                st = self.disks[r.disk]
                st.gen, st.seq = r.gen, r.seq
                self.gate.journaled(r.disk, r.kind)
                self.seeds.note(r.disk, r.kind, r.offset, r.length)
            self.checkpoints.extend(new_cps)
            self._head.appended(fresh)
            self.newest()
            self._mend()
            applier.promote(self)
            self._publish()
        return len(fresh), ids

    def seed_frames(self) -> Tuple[List[Tuple[int, int]], List[Tuple[int, int, int, bytes,
                                                                      bytes]]]:
        """What OPENED says (each disk's durable point) and, at the same instant, the SEED
        frames: (disk, chunk, first chunk, digests, touched map)."""
        with self._lock:
            return self.durable(), self.seeds.frames()

    # -- applying ------------------------------------------------------------------------

    def _apply(self, stop: Optional[Position] = None) -> None:
        applier.apply(self, stop)

    def maintain(self) -> None:
        """Promote what aged out of the window (called now and then, not only on batches)."""
        with self._lock:
            if self.state in (GroupState.RECEIVING, GroupState.JOURNAL_DAMAGED):
                try:
                    applier.promote(self)
                except OSError as e:
                    self._storage_failed(e)
                    raise
            self._publish()

    def settle(self) -> None:
        """After meta.rebuild: apply the whole journal (hold-back and damage still stop
        it) and checkpoint, so the replicas are at a known point again; the checkpoints
        before it leave the list (the replicas' true point was not known)."""
        with self._lock:
            applier.apply(self)
            applier.checkpoint(self)
            self._publish()

    def checkpoint(self) -> None:
        with self._lock:
            applier.checkpoint(self)
            self._publish()

    # -- reading -------------------------------------------------------------------------

    def newest(self) -> Tuple[List[Point], bool]:
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
        whether a resync holds the newest state back. Call with the lock held. A failed-over
        group has only the points that still read true (``failover.point``)."""
        if self.failover is not None:
            return failover.point(self, ref, at_wall_ns)
        for i, st in enumerate(self.disks):
            if not self.gate.whole(i):
                raise NoConsistentState(
                    "disk %s of group %s has no consistent state yet: its initial sync has "
                    "not ended" % (st.name, self.name))
        if ref is None and at_wall_ns is None:
            points, held = self.newest()
            self._check_intact(None)
            return None, points, held
        c = choose(self.checkpoints, ref, at_wall_ns)
        self._check_intact(c)
        return c, list(c.cut), False

    def _check_intact(self, c: Optional[Checkpoint]) -> None:
        mending.check_intact(self, c)

    def _mend(self) -> None:
        self.mending.follow(self)

    def asks(self) -> mending.Asks:
        """What to ask the source for again (``mending.py``)."""
        if not self.journal.damage and not self.mending.replica_asks:
            return []  # nothing found (read without the lock: the next call sees it)
        with self._lock:
            out = self.mending.asks(self)
            self._publish()
            return out

    def restore(self, disk: str, dest: str, ref: Optional[str] = None,
                at_wall_ns: Optional[int] = None) -> Dict[str, Any]:
        """Write ``disk`` as of a checkpoint (default: its newest consistent state) to the
        new file ``dest``; durable (data and name) when it returns (``restore.py``)."""
        with self._lock:
            try:
                return restore(self, disk, dest, ref, at_wall_ns)
            except ChunkDamaged as e:
                self.mending.replica_asks.append((e.disk, e.ranges))
                log.error("%s", e)
                raise
            finally:
                self._publish()  # a read may have found damage

    def view_spec(self, ref: Optional[str], at_wall_ns: Optional[int]
                  ) -> Tuple[Optional[Checkpoint], List[Dict[str, Any]]]:
        """Pin the group (no promotion) and describe each disk at a point for the view
        plugin (``nbd_plugin/view.py``). ``unpin`` when the view is closed."""
        with self._lock:
            c, cut, _held = self.point(ref, at_wall_ns)
            for i in range(len(self.disks)):
                try:  # chunks found damaged before, that the view would read
                    check_replica(self, i, cut[i], known_only=True)
                except ChunkDamaged as e:
                    self.mending.replica_asks.append((e.disk, e.ranges))
                    self._publish()
                    raise
            self.pins += 1
            self._publish()
            segments = [[segno, self.journal.path(segno), self.journal.segment_size(segno)]
                        for segno in self.journal.segments() if segno >= self.applied[0]]
            specs = []
            for i, st in enumerate(self.disks):
                specs.append({"group": self.name, "name": st.name, "xxhash_path": _XXHASH_PATH,
                              "damage": [[d.segment, d.offset, max(d.end, d.offset + 1)]
                                         for d in self.journal.damage],
                              "replica": self.replica_path(st.name),
                              "size": st.size_at(cut[i]),
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
                # Every record it may apply checked first: a failover never stops half-way
                # on damage (point() refuses the points that need it).
                self.journal.verify(self.applied, last=True)
                return failover.live(self, ref, at_wall_ns)
            except OSError as e:  # B's disk failed: nothing half made is left live
                if failover.state_of(self.failover) is failover.State.APPLYING:
                    failover.abandon(self)
                    self._go(GroupEvent.ROLLBACK)
                raise StorageError("group %s: failover refused: %s; nothing was made live"
                                   % (self.name, reads.one_line(e)), e.filename,
                                   e.errno) from None
            finally:
                self._publish()

    def failover_commit(self) -> Dict[str, Any]:
        """The failover point becomes the group's base (``failover.py``)."""
        with self._lock:
            try:
                return failover.commit(self)
            finally:
                self._publish()

    def failover_rollback(self) -> Dict[str, Any]:
        """Begin a rollback: saved; the caller stops the live export, then
        ``failover_rolled_back`` (``failover.py``)."""
        with self._lock:
            try:
                return failover.rollback(self)
            finally:
                self._publish()

    def failover_rolled_back(self) -> Dict[str, Any]:
        """End a rollback: the live disks deleted, the group replicates again."""
        with self._lock:
            try:
                out = failover.finish_rollback(self)
                self._go(GroupEvent.ROLLBACK)
                return out
            finally:
                self._publish()

    def failover_exports(self, uris: Dict[str, str]) -> None:
        """Remember where the live disks are served (for messages and status)."""
        with self._lock:
            if self.failover is not None and self.failover.get("exports") != uris:
                self.failover["exports"] = dict(uris)
                self.save_meta()
            self._publish()

    def failover_set(self, key: str, value: Any) -> None:
        """Save ``key`` of the failover record (None: remove it), e.g. its failback."""
        with self._lock:
            if self.failover is not None:
                if value is None:
                    self.failover.pop(key, None)
                else:
                    self.failover[key] = value
                self.save_meta()
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
        """Each checkpoint; one that needs damaged records says so under ``refused``."""
        with self._lock:
            out = []
            for c in self.checkpoints:
                item = c.to_json()
                if self.failover is None and self.journal.damage:
                    try:
                        self._check_intact(c)
                    except JournalCorrupt as e:
                        item["refused"] = str(e)
                out.append(item)
            return out

    # -- status --------------------------------------------------------------------------

    def status(self) -> Dict[str, Any]:
        """The group's status as of its last change (never waits for the lock: it is
        asked from the agent's event loop)."""
        return status.read(self._snapshot)

    def _publish(self) -> None:
        """A new status snapshot, as things stand (call with the lock held)."""
        if self.journal.damage and self.state is not GroupState.CLOSED:
            for d in self.journal.damage:
                if (d.segment, d.offset) not in self._reported:
                    self._reported.add((d.segment, d.offset))
                    log.error("%s; the points that need it are refused until it is "
                              "repaired from the source", self.journal.describe(d))
            if any(d.repaired_at is None for d in self.journal.damage):
                self._go(GroupEvent.DAMAGED)
            elif self.state is GroupState.JOURNAL_DAMAGED:
                self._go(GroupEvent.REPAIRED)
        self._snapshot = status.snapshot(self, self._snapshot)
        err = self.storage_error
        self._snapshot["error"] = err["error"] if err else None
        self._snapshot["storage_error"] = dict(err) if err else None
        if err:
            self._snapshot["state"] = "storage-error"  # shown over the life state

    def close(self) -> None:
        with self._lock:
            if self.state is GroupState.CLOSED:
                return
            applier.checkpoint(self)
            for w in self.writers:
                w.close()
            for fd in self.fds:
                os.close(fd)
            self.fds = []
            self.writers = []
            self.journal.close()
            self._go(GroupEvent.CLOSE)

    def remove(self) -> None:
        self.close()
        shutil.rmtree(self.directory)
