"""A target group's status, as ``ferry status --json`` shows it under ``replicas``.

The group publishes a snapshot (``snapshot``) at the end of every change, with its lock held,
in the worker thread that made the change; the event loop reads the newest one (``read``)
without taking the lock, so a busy group (a batch, a long restore) never stalls status,
metrics or shipping on the agent. Only ``history_covered_s`` depends on the clock, so it is
computed when read.

**Whose clock.** Checkpoints carry the source's wall time (``wall_ns``), which may be hours
off site B's. ``history_covered_s`` never compares the two: it is the span between the oldest
and the newest checkpoint in the source's clock, plus the time since site B received the
newest one by site B's monotonic clock (noted by ``snapshot`` when a new newest appears).
After site B restarts, that time counts from its first snapshot: until the next checkpoint
arrives the figure is short by the time from the newest one's arrival to the restart (never
long, so the ``history`` alert is never silenced by it).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Optional

from .state import GroupData

Snapshot = Dict[str, Any]
RECEIVED = "_newest_received"  # site B's time.monotonic() when the newest checkpoint came


def snapshot(g: GroupData, prev: Optional[Snapshot] = None) -> Snapshot:
    """The group's status as things stand (call with its lock held); ``prev`` is the
    snapshot it replaces (it says when the newest checkpoint was received)."""
    head, held = g.newest()
    oldest = g.checkpoints[0] if g.checkpoints else None
    newest = g.checkpoints[-1] if g.checkpoints else None
    received = received_at(prev, newest.id if newest else None, time.monotonic())
    untouched = [m.untouched() if m is not None else None for m in g.seeds]
    return {
        "journal_bytes": g.journal.size(),
        "journal_segments": len(g.journal.segments()),
        "history_s": g.history_s,
        "journal_max": g.journal_max,
        # --journal-reserve: {bytes, used, allocated, slot, slots}, else None (reserve.py)
        "journal_reserve": g.journal.reserve.usage(g.journal.size())
        if g.journal.reserve is not None else None,
        "history_covered_s": 0.0,  # from the oldest and newest checkpoints, when read
        RECEIVED: received,
        "history_short": g.short_history,
        "checkpoints": len(g.checkpoints),
        "oldest_checkpoint": oldest.to_json() if oldest else None,
        "newest_checkpoint": newest.to_json() if newest else None,
        "views_open": g.pins,
        "failover": dict(g.failover) if g.failover is not None else None,
        "state": g.state.value,
        # Journal records B cannot vouch for (journal.py): what the repair must resend.
        "damage": [dict(d.to_json(), file=g.journal.path(d.segment),
                        disk=g.disks[d.disk].name if d.disk is not None
                        and d.disk < len(g.disks) else None)
                   for d in g.journal.damage],
        "disks": {d.name: {"size": d.size, "durable_gen": d.gen, "durable_seq": d.seq,
                           "applied_gen": d.applied_gen,
                           "applied_seq": d.applied_seq,
                           "newest_gen": head[i][0], "newest_seq": head[i][1],
                           "consistent": g.gate.whole(i) and not held,
                           "ever_consistent": g.gate.whole(i),
                           "seed_untouched_chunks": untouched[i],
                           "replica": g.replica_path(d.name),
                           # The raw replica, and the image of the group's replica format
                           # over it (wrappers.py; the raw file itself for raw).
                           "replica_format": g.replica_format,
                           "replica_image": g.image_path(d.name),
                           "replica_image_error": g.image_errors.get(d.name),
                           "replica_allocated_bytes": _allocated(g, i)}
                  for i, d in enumerate(g.disks)},
    }


def received_at(prev: Optional[Snapshot], newest: Optional[str], now: float) -> float:
    """When site B received its newest checkpoint ``newest`` (an id): as ``prev`` says if
    that was its newest too, else ``now``."""
    if prev and newest is not None and RECEIVED in prev and (
            prev.get("newest_checkpoint") or {}).get("id") == newest:
        return float(prev[RECEIVED])
    return now


def _allocated(g: GroupData, i: int) -> Optional[int]:
    """The bytes the file system holds for replica ``i`` (None if it cannot say)."""
    try:
        return os.fstat(g.fds[i]).st_blocks * 512
    except (OSError, IndexError):
        return None


def read(snap: Snapshot) -> Dict[str, Any]:
    """A copy of a snapshot for one answer, with the history it covers as of now."""
    out = dict(snap)
    out.pop(RECEIVED, None)
    out["history_covered_s"] = covered(snap, time.monotonic())
    out["disks"] = {k: dict(v) for k, v in snap["disks"].items()}
    # Kept for scripts that read it: a snapshot is never an older answer given again.
    out["stale"] = False
    return out


def covered(snap: Snapshot, now: float) -> float:
    """Seconds of history the journal holds as of ``now`` (site B's ``time.monotonic()``):
    the checkpoints' span in the source's clock plus site B's time since the newest came."""
    oldest, newest = snap["oldest_checkpoint"], snap["newest_checkpoint"]
    if not oldest or not newest:
        return 0.0
    span = max(0, newest["wall_ns"] - oldest["wall_ns"]) / 1e9
    return round(span + max(0.0, now - snap[RECEIVED]), 3)
