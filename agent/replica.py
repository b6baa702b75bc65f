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

Every ``CHECKPOINT_BYTES`` applied, and on close, the replicas are fdatasynced, then
``meta.json`` records the journal position applied so far (atomic replace), then whole
segments before it are deleted. A crash between those steps re-applies records from the
last recorded position, which is harmless: applying a record twice in order gives the same
bytes.

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
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

from nbd_plugin.disk import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from nbd_plugin.localwire import (
    FLAG_INCONSISTENT,
    KIND_CONSISTENT,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
)
from nbd_plugin.state import write_atomic

from .journal import Journal, JRecord, Position
from .wire import MAX_RECORD, ProtocolError

log = logging.getLogger("ferry.replica")

CHECKPOINT_BYTES = 256 * 1024 * 1024


class SizeMismatch(Exception):
    pass


class NoConsistentState(Exception):
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


class TargetGroup:
    def __init__(self, directory: str, name: str, disks: List[Tuple[str, int]],
                 protection: Optional[str] = None) -> None:
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
        self.protection = meta.get("protection") if protection is None else protection
        if meta and self.protection != meta.get("protection"):
            log.warning("group %s: a new protection replaces the old one; its replicas wait "
                        "for a full sync", name)
            shutil.rmtree(os.path.join(directory, "journal"), ignore_errors=True)
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
        self.journal = Journal(os.path.join(directory, "journal"))
        if self.journal.dropped_tail:
            log.warning("group %s: dropped a torn journal tail of %d bytes",
                        name, self.journal.dropped_tail)
        applied = meta.get("applied")
        self.applied: Position = (applied[0], applied[1]) if applied else self.journal.start
        if self.applied < self.journal.start:
            self.applied = self.journal.start
        self._since_checkpoint = 0
        # Learn what the journal holds beyond the replicas.
        for rec, _pos in self.journal.read_from(self.applied):
            st = self.disks[rec.disk]
            st.gen, st.seq = rec.gen, rec.seq
            if rec.kind == KIND_CONSISTENT:
                st.consistent_pending += 1
        self._save_meta()
        self._apply()

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

    def _save_meta(self) -> None:
        meta = {
            "group": self.name,
            "protection": self.protection,
            "applied": list(self.applied),
            "disks": [{"name": d.name, "size": d.size, "applied_gen": d.applied_gen,
                       "applied_seq": d.applied_seq, "ever_consistent": d.ever_consistent}
                      for d in self.disks],
        }
        write_atomic(self._meta_path, json.dumps(meta, indent=1).encode())

    # -- receiving -----------------------------------------------------------------------

    def durable(self) -> List[Tuple[int, int]]:
        """(gen, seq) of the newest journaled record of each disk."""
        return [(d.gen, d.seq) for d in self.disks]

    def accept(self, records: List[JRecord]) -> int:
        """Check, journal and apply a batch; returns how many records were new."""
        with self._lock:
            fresh = self._check(records)
            if fresh:
                self.journal.append(fresh)
                for r in fresh:
                    st = self.disks[r.disk]
                    st.gen, st.seq = r.gen, r.seq
                    if r.kind == KIND_CONSISTENT:
                        st.consistent_pending += 1
                self._apply()
            return len(fresh)

    def _check(self, records: List[JRecord]) -> List[JRecord]:
        """Every check before any write: a bad batch changes nothing."""
        cursor = [(d.gen, d.seq) for d in self.disks]
        fresh = []
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
            fresh.append(r)
        return fresh

    # -- applying ------------------------------------------------------------------------

    def _apply(self) -> None:
        pos = self.applied
        for rec, after in self.journal.read_from(pos):
            st = self.disks[rec.disk]
            if rec.flags & FLAG_INCONSISTENT and st.ever_consistent and not st.consistent_pending:
                if not st.holding:
                    log.info("group %s: disk %s is resyncing; its replica stays at %d/%d "
                             "until the resync ends", self.name, st.name, st.applied_gen,
                             st.applied_seq)
                st.holding = True
                break
            fd = self._fds[rec.disk]
            if rec.kind == KIND_WRITE:
                assert rec.data is not None
                view = memoryview(rec.data)
                off = rec.offset
                while view:
                    n = os.pwrite(fd, view, off)
                    view, off = view[n:], off + n
                self._since_checkpoint += rec.length
            elif rec.kind in (KIND_ZERO, KIND_TRIM) and rec.length:
                fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, rec.offset, rec.length)
            elif rec.kind == KIND_CONSISTENT:
                st.consistent_pending -= 1
                st.ever_consistent = True
                st.holding = False
            st.applied_gen, st.applied_seq = rec.gen, rec.seq
            pos = after
            if self._since_checkpoint >= CHECKPOINT_BYTES:
                self.applied = pos
                self._checkpoint()
        self.applied = pos

    def _checkpoint(self) -> None:
        for fd in self._fds:
            os.fdatasync(fd)
        self._save_meta()
        self.journal.drop_before(self.applied[0])
        self._since_checkpoint = 0

    def checkpoint(self) -> None:
        with self._lock:
            self._checkpoint()

    # -- reading -------------------------------------------------------------------------

    def restore(self, disk: str, dest: str) -> Dict[str, Any]:
        """Copy ``disk``'s newest consistent state to the new file ``dest``."""
        with self._lock:
            st = self._disk(disk)
            if not st.ever_consistent:
                raise NoConsistentState(
                    "disk %s of group %s has no consistent state yet: its initial sync has "
                    "not ended" % (disk, self.name))
            self._apply()
            self._checkpoint()
            src = self.replica_path(disk)
            tmp = dest + ".ferry-partial"
            _sparse_copy(src, tmp, st.size)
            os.rename(tmp, dest)
            _fsync_parent(dest)
            return {"group": self.name, "disk": disk, "to": dest, "size": st.size,
                    "gen": st.applied_gen, "seq": st.applied_seq, "resyncing": st.holding}

    def _disk(self, name: str) -> DiskState:
        for st in self.disks:
            if st.name == name:
                return st
        raise KeyError(name)

    def status(self) -> Dict[str, Any]:
        return {
            "journal_bytes": self.journal.size(),
            "journal_segments": len(self.journal.segments()),
            "disks": {d.name: {"size": d.size, "durable_gen": d.gen, "durable_seq": d.seq,
                               "applied_gen": d.applied_gen, "applied_seq": d.applied_seq,
                               "consistent": d.ever_consistent and not d.holding,
                               "ever_consistent": d.ever_consistent,
                               "replica": self.replica_path(d.name)}
                      for d in self.disks},
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


def _fsync_parent(path: str) -> None:
    fd = os.open(os.path.dirname(os.path.abspath(path)) or ".", os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def open_or_none(directory: str) -> Optional[Dict[str, Any]]:
    """The saved metadata of a group directory, if any."""
    try:
        with open(os.path.join(directory, "meta.json")) as f:
            meta: Dict[str, Any] = json.load(f)
            return meta
    except FileNotFoundError:
        return None
