"""Failover live, as a state machine persisted in meta.json: start, then commit or roll back.

Theory of operation
-------------------
``live`` picks the point (a checkpoint, a wall time, or the newest consistent state) and
saves a failover record in meta.json (state ``applying``, the point's cut, the live disks'
paths), then ``finish``es: each disk's replica is copied (sparsely; a reflink where the file
system has them) to ``<group>/live/<disk>.img.partial``, the journal records of the disk up
to the cut are written onto the copy, which is fdatasynced and renamed to ``<disk>.img``;
then the record's state becomes ``done``: failed over, uncommitted. The replicas and the
journal are left as they were, so the points at or before the failover point still read
true (``point``), and a rollback has something to go back to. From ``applying`` on the group
takes no more changes; the live disks are served by ``views.py`` (``live-<group>``).

``commit`` makes the failover point the group's base: the records up to the cut are written
onto the replicas (fdatasynced; meta.json then says the replicas hold the cut), every
journal segment is deleted (the points before the failover and A's records after it are
gone), a ``KIND_FAILOVER`` marker starts the new journal, and the state is ``committed``.
``rollback`` (the export stopped first by the caller) deletes the live disks and the record:
the group replicates again from where its journal and replicas stood, and the source resends
what it wrote meanwhile. Each step is saved before it starts, and a crash half-way is
finished when the group opens again (``resume``): every step can be done twice.

    state         event        next
    none          start        applying
    applying      applied      done           (failed over, uncommitted)
    done          commit       committing
    committing    committed    committed
    done          rollback     rolling-back
    rolling-back  rolled-back  none
    applying      abandoned    none           (a live disk could not be made: abandon)

A failback's group (``failback.py``: its replicas are the old source's original disks,
adopted in place) fails over onto its replicas, as an earlier Ferry did: the disks the VM ran
on are live again, and such a failover cannot be rolled back. Once the live disks fail back
(a ``failback`` entry in the record), a splitter serves them, not ``views.py``.

A request the state forbids is refused first (``Conflict``: a second failover, a commit or
a rollback of a group not failed over, a rollback after a commit), naming the state; any
other step is an ``IllegalTransition``. A record saved by an earlier Ferry, whose failover
wrote onto the replicas (no ``live`` paths), can be committed but not rolled back.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import shutil
import time
from typing import Any, Dict, List, Optional, Tuple

from formats.durable import ReplaceFile, fsync_dir
from formats.records import KIND_FAILOVER, JRecord, Point

from ..checkpoints import Checkpoint, choose, iso
from ..errors import Conflict
from .failback import in_place
from .restore import sparse_copy, write_overlay
from .state import GroupData
from .transitions import Table

log = logging.getLogger("ferry.replica")


class State(enum.Enum):
    NONE = "none"                  # never failed over, or rolled back (no record)
    APPLYING = "applying"          # the record is saved; the live disks are being made
    DONE = "done"                  # the live disks serve: failed over, uncommitted
    COMMITTING = "committing"      # the replicas are being brought to the failover point
    COMMITTED = "committed"        # the failover point is the group's base
    ROLLING_BACK = "rolling-back"  # the live disks are being deleted


class Event(enum.Enum):
    START = "start"
    APPLIED = "applied"
    COMMIT = "commit"
    COMMITTED = "committed"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled-back"
    ABANDONED = "abandoned"


FAILOVER = Table[State, Event]("a failover", {
    (State.NONE, Event.START): State.APPLYING,
    (State.APPLYING, Event.APPLIED): State.DONE,
    (State.DONE, Event.COMMIT): State.COMMITTING,
    (State.COMMITTING, Event.COMMITTED): State.COMMITTED,
    (State.DONE, Event.ROLLBACK): State.ROLLING_BACK,
    (State.ROLLING_BACK, Event.ROLLED_BACK): State.NONE,
    (State.APPLYING, Event.ABANDONED): State.NONE,
})

STATES = frozenset(s.value for s in State if s is not State.NONE)  # meta.FAILOVER_STATES

LABELS = {
    State.NONE: "replicating",
    State.APPLYING: "failing over",
    State.DONE: "failed over, uncommitted",
    State.COMMITTING: "committing the failover",
    State.COMMITTED: "failed over, committed",
    State.ROLLING_BACK: "rolling the failover back",
}


def state_of(record: Optional[Dict[str, Any]]) -> State:
    return State.NONE if record is None else State(record["state"])


def serving(record: Optional[Dict[str, Any]]) -> bool:
    """Whether a group with this record has live disks to export (not once it fails back:
    a splitter serves them then, ``source/failback.py``)."""
    return state_of(record) in (State.DONE, State.COMMITTING, State.COMMITTED) \
        and not (record or {}).get("failback")


def live_path(g: GroupData, disk: str) -> str:
    """The file that is ``disk``'s live disk (an earlier Ferry's failover: the replica)."""
    assert g.failover is not None
    return g.failover.get("live", {}).get(disk) or g.replica_path(disk)


def describe(g: GroupData) -> str:
    """"live at <export> since <point>", for a failed-over group's messages."""
    f = g.failover
    assert f is not None
    where = ", ".join(sorted((f.get("exports") or {}).values())) or \
        ", ".join(live_path(g, d.name) for d in g.disks)
    c = f.get("checkpoint")
    since = "checkpoint %s (%s)" % (c["id"], iso(c["wall_ns"])) if c else \
        "its newest consistent state of %s" % iso(f["wall_ns"])
    return "is live at %s since %s (%s)" % (where, since, LABELS[state_of(f)])


def _set(g: GroupData, state: State) -> None:
    assert g.failover is not None
    g.failover["state"] = state.value
    g.failover["label"] = LABELS[state]


# -- points while failed over ------------------------------------------------------------

def point(g: GroupData, ref: Optional[str], at_wall_ns: Optional[int]
          ) -> Tuple[Optional[Checkpoint], List[Point], bool]:
    """A point of a failed-over group that still reads true: a checkpoint at or before the
    failover point, before a commit; Conflict for any other (the one-line reason says where
    the disks are live since when)."""
    assert g.failover is not None
    state = state_of(g.failover)
    if state in (State.COMMITTING, State.COMMITTED):
        raise Conflict("group %s %s; the points before it were discarded by the commit"
                       % (g.name, describe(g)))
    if ref is None and at_wall_ns is None:
        raise Conflict("group %s %s; its newest state is that disk: give --checkpoint or "
                       "--at at or before the failover point" % (g.name, describe(g)))
    c = choose(g.checkpoints, ref, at_wall_ns)
    cut = [tuple(p) for p in g.failover["cut"]]
    if any(tuple(p) > q for p, q in zip(c.cut, cut)):
        raise Conflict("group %s %s; checkpoint %s (%s) is after that point, on the "
                       "timeline the failover left" % (g.name, describe(g), c.id,
                                                       iso(c.wall_ns)))
    return c, list(c.cut), False


# -- start -------------------------------------------------------------------------------

def live(g: GroupData, ref: Optional[str], at_wall_ns: Optional[int]) -> Dict[str, Any]:
    """Make live disks of the point (default: the newest consistent state) and take no more
    changes. Durable when it returns (see the module). Call with the group's lock held."""
    if g.failover is not None:
        raise Conflict("group %s already failed over here: it %s; %s" % (
            g.name, describe(g), "commit or roll it back first (ferry failover %s --commit "
            "| --rollback)" % g.name if state_of(g.failover) is State.DONE else
            "nothing more to fail over"))
    if g.pins:
        raise Conflict("group %s has views or a test failover open; close them first"
                       % g.name)
    c, cut, _held = g.point(ref, at_wall_ns)
    state = FAILOVER.step(State.NONE, Event.START)
    live_dir = os.path.join(g.directory, "live")
    record = {"state": state.value, "label": LABELS[state],
              "checkpoint": c.to_json() if c else None,
              "cut": [list(p) for p in cut], "wall_ns": time.time_ns(),
              "live": {d.name: os.path.join(live_dir, d.name + ".img") for d in g.disks}}
    if all(in_place(g.replica_path(d.name)) for d in g.disks):
        del record["live"]  # a failback's replicas are the original disks: live on them
        record["in_place"] = True
    g.failed_over(record)
    g.save_meta()
    finish(g)
    assert g.failover is not None
    return dict(g.failover)


def finish(g: GroupData) -> None:
    """Make the live disks at the record's cut and mark it done (see the module)."""
    assert g.failover is not None
    state = FAILOVER.step(state_of(g.failover), Event.APPLIED)
    cut = [(p[0], p[1]) for p in g.failover["cut"]]
    if "live" in g.failover:
        os.makedirs(os.path.join(g.directory, "live"), exist_ok=True)
        for i, st in enumerate(g.disks):
            with ReplaceFile(live_path(g, st.name), 0o600) as out:
                sparse_copy(g.replica_path(st.name), out.fd, st.size)
                write_overlay(g, out.fd, i, cut[i])
                out.commit()
        fsync_dir(os.path.join(g.directory, "live"))
    else:  # an earlier Ferry's record: the cut goes onto the replicas, as it did then
        for i, fd in enumerate(g.fds):
            write_overlay(g, fd, i, cut[i])
            os.fdatasync(fd)
            g.digests[i].forget()
        for st, p in zip(g.disks, cut):
            st.applied_gen, st.applied_seq = p
    _set(g, state)
    g.failover["served_ns"] = time.time_ns()  # a live disk changed after this was written
    g.save_meta(synced="live" not in g.failover)
    c = g.failover.get("checkpoint")
    log.warning("group %s: FAILED OVER LIVE at %s; its live disks are served now, "
                "replication of it has stopped (commit or roll back: ferry failover %s "
                "--commit | --rollback)", g.name, "checkpoint %s" % c["id"] if c
                else "its newest consistent state", g.name)


def resume(g: GroupData) -> None:
    """Finish what a crash cut short (the group is opening; see the module)."""
    state = state_of(g.failover)
    if state is State.APPLYING:
        finish(g)
    elif state is State.COMMITTING:
        finish_commit(g)
    elif state is State.ROLLING_BACK:
        finish_rollback(g)


def _forget(g: GroupData) -> None:
    """Delete the live disks and the failover's record, durably."""
    live_dir = os.path.join(g.directory, "live")
    if os.path.isdir(live_dir):
        shutil.rmtree(live_dir)
        fsync_dir(g.directory)
    g.failover = None
    g.save_meta()


def abandon(g: GroupData) -> None:
    """A live disk could not be made (site B's disk failed a read or a write): delete what
    was made and the record, as if the failover had not begun. Lock held; the group
    replicates again once the caller moves it on."""
    FAILOVER.step(state_of(g.failover), Event.ABANDONED)
    _forget(g)
    log.error("group %s: failover abandoned (its live disks could not be made); it "
              "replicates again from its journal", g.name)


# -- commit ------------------------------------------------------------------------------

def commit(g: GroupData) -> Dict[str, Any]:
    """Make the failover point the group's base (see the module). Lock held."""
    state = state_of(g.failover)
    if state is State.NONE:
        raise Conflict("group %s is not failed over here (replicating); nothing to "
                       "commit" % g.name)
    if state is not State.DONE:
        raise Conflict("group %s %s; nothing to commit" % (g.name, describe(g)))
    if g.pins:
        raise Conflict("group %s has views or a test failover open; close them before "
                       "the commit discards their points" % g.name)
    _set(g, FAILOVER.step(state, Event.COMMIT))
    g.save_meta()
    finish_commit(g)
    assert g.failover is not None
    return dict(g.failover)


def finish_commit(g: GroupData) -> None:
    assert g.failover is not None
    state = FAILOVER.step(state_of(g.failover), Event.COMMITTED)
    cut = [(p[0], p[1]) for p in g.failover["cut"]]
    if "live" in g.failover:  # (an earlier Ferry wrote the cut onto the replicas already)
        for i, fd in enumerate(g.fds):
            write_overlay(g, fd, i, cut[i])
            os.fdatasync(fd)
            g.digests[i].forget()
    for st, p in zip(g.disks, cut):
        st.applied_gen, st.applied_seq = p
        st.gen, st.seq = p
    g.save_meta(synced=True)  # the replicas hold the cut: a crash from here applies nothing
    g.journal.rotate()
    g.journal.drop_before(g.journal.segments()[-1])
    g.applied = g.journal.start
    g.checkpoints.clear()
    data = json.dumps(g.failover, sort_keys=True).encode()
    g.journal.append([JRecord(0, 0, 0, KIND_FAILOVER, 0, 0, len(data), 0, data)])
    _set(g, state)
    g.save_meta(synced=True)
    log.warning("group %s: failover COMMITTED; its replicas hold the failover point and its "
                "journal before and after it is discarded", g.name)


# -- rollback ----------------------------------------------------------------------------

def rollback(g: GroupData) -> Dict[str, Any]:
    """Begin a rollback (saved): the caller stops the live export, then ``finish_rollback``.
    Lock held."""
    state = state_of(g.failover)
    if state is State.NONE:
        raise Conflict("group %s is not failed over here (replicating); nothing to roll "
                       "back" % g.name)
    if state is State.ROLLING_BACK:
        return dict(g.failover or {})  # a rollback cut short: go on with it
    if state is not State.DONE:
        raise Conflict("group %s %s; a committed failover cannot be rolled back"
                       % (g.name, describe(g)))
    assert g.failover is not None
    if "live" not in g.failover:
        raise Conflict("group %s %s, failed over %s: it cannot be rolled back (commit it)"
                       % (g.name, describe(g), "onto its original disks (a failback)"
                          if g.failover.get("in_place") else
                          "by an earlier Ferry onto its replicas"))
    _set(g, FAILOVER.step(state, Event.ROLLBACK))
    g.save_meta()
    return dict(g.failover)


def finish_rollback(g: GroupData) -> Dict[str, Any]:
    """Delete the live disks and the record (the export is stopped). Lock held; the group
    replicates again once the caller moves it on."""
    assert g.failover is not None
    record = dict(g.failover)
    FAILOVER.step(state_of(record), Event.ROLLED_BACK)
    _forget(g)
    record.update(state=State.NONE.value, label=LABELS[State.NONE])
    log.warning("group %s: failover ROLLED BACK; its live writes are discarded and it "
                "replicates again from its journal", g.name)
    return record
