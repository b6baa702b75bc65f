"""Failover live: a target group's replicas become the disks, as of a point in time.

Theory of operation
-------------------
``live`` picks the point (a checkpoint, a wall time, or the newest consistent state), saves
a failover record in meta.json (state ``applying``, the point's cut), then ``finish``es: the
journal records of each disk up to the cut are written onto its replica, every replica is
fdatasynced, a ``KIND_FAILOVER`` marker is journaled, and the record's state becomes
``done`` (meta.json again, its applied position with it). From ``applying`` on the group
takes no more changes. A crash half-way leaves ``applying`` in meta.json, and opening the
group finishes it again: the same records are applied again, in order, to the same bytes.

    state       event       next
    none        start       applying
    applying    applied     done

A second failover of a group, or one while views pin it, is refused before it starts
(``CheckpointError``); any other step is an ``IllegalTransition``.
"""

from __future__ import annotations

import enum
import json
import logging
import os
import time
from typing import Any, Dict, Optional

from formats.records import KIND_FAILOVER, JRecord

from ..checkpoints import CheckpointError
from .restore import write_overlay
from .state import GroupData
from .transitions import Table

log = logging.getLogger("ferry.replica")


class State(enum.Enum):
    NONE = "none"          # never failed over (no record in meta.json)
    APPLYING = "applying"  # the record is saved; the replicas are being brought to the cut
    DONE = "done"          # the replicas are the live disks


class Event(enum.Enum):
    START = "start"
    APPLIED = "applied"


FAILOVER = Table[State, Event]("a failover", {
    (State.NONE, Event.START): State.APPLYING,
    (State.APPLYING, Event.APPLIED): State.DONE,
})

STATES = frozenset(s.value for s in State if s is not State.NONE)  # what meta.json may say


def state_of(record: Optional[Dict[str, Any]]) -> State:
    return State.NONE if record is None else State(record["state"])


def live(g: GroupData, ref: Optional[str], at_wall_ns: Optional[int]) -> Dict[str, Any]:
    """Make the replicas the disks as of a point (default: the newest consistent state)
    and take no more changes. Durable when it returns (see the module). Call with the
    group's lock held."""
    if g.failover is not None:
        raise CheckpointError("group %s already failed over here" % g.name)
    if g.pins:
        raise CheckpointError("group %s has views or a test failover open; close them "
                              "first" % g.name)
    c, cut, _held = g.point(ref, at_wall_ns)
    state = FAILOVER.step(State.NONE, Event.START)
    g.failed_over({"state": state.value, "checkpoint": c.to_json() if c else None,
                   "cut": [list(p) for p in cut], "wall_ns": time.time_ns()})
    g.save_meta()
    finish(g)
    assert g.failover is not None
    return dict(g.failover)


def finish(g: GroupData) -> None:
    """Bring the replicas to the failover record's cut and mark it done (see the module)."""
    assert g.failover is not None
    state = FAILOVER.step(state_of(g.failover), Event.APPLIED)
    cut = [(p[0], p[1]) for p in g.failover["cut"]]
    for i, fd in enumerate(g.fds):
        write_overlay(g, fd, i, cut[i])
        os.fdatasync(fd)
    data = json.dumps(g.failover, sort_keys=True).encode()
    g.journal.append([JRecord(0, 0, 0, KIND_FAILOVER, 0, 0, len(data), 0, data)])
    for st, p in zip(g.disks, cut):
        st.applied_gen, st.applied_seq = p
    g.failover["state"] = state.value
    g.save_meta(synced=True)  # the replicas were fdatasynced at the cut
    c = g.failover.get("checkpoint")
    log.warning("group %s: FAILED OVER LIVE at %s; its replicas are the live disks now and "
                "replication of it has stopped", g.name,
                "checkpoint %s" % c["id"] if c else "its newest consistent state")
