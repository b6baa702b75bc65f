"""A target group's damage and its repair, as the group sees it: which points damage keeps
from being read, what to ask the source for, and when records journaled later repaired it.

Theory of operation
-------------------
The journal records damage (``journal.py``, ``damage.py``). For each damage not yet
repaired, ``Mending.follow`` feeds the records journaled after it to a ``damage.Mend``
(from where it stopped the last time); once they cover every range the damage needs, the
damage gets ``repaired_at`` and ``repaired_points`` (saved in ``damage.json``). ``asks``
gives, once per damage and agent run, the ranges still uncovered (the source is asked for
them), and the replica chunks a read found failing their digests. ``check_intact`` refuses a
point that needs damaged records: damage after the replicas' position, before the point's
checkpoint marker (or anywhere, for the newest state), that is not repaired for the point's
cut; a repaired one refuses only the points in its gap.

Every method is called with the group's lock held.
"""

from __future__ import annotations

import logging
from typing import Dict, List, Optional, Set, Tuple

from formats.records import DATA_KINDS, KIND_CHECKPOINT
from formats.segment import RECORD

from ..checkpoints import Checkpoint
from . import damage
from .journal import JournalCorrupt, Position
from .restore import entries_from
from .state import GroupData

log = logging.getLogger("ferry.replica")

Asks = List[Tuple[int, List[Tuple[int, int]]]]  # (disk, [(offset, length), ...])


class Mending:
    def __init__(self) -> None:
        self._mends: Dict[Tuple[int, int], Tuple[damage.Mend, Position]] = {}
        self._asked: Set[Tuple[int, int]] = set()  # damage whose ranges were asked for
        self.replica_asks: Asks = []  # replica chunks a read found damaged

    def follow(self, g: GroupData) -> None:
        """Feed the records journaled after each damage not yet repaired; a damage they
        now cover is repaired (see the module)."""
        changed = False
        sizes = [d.size for d in g.disks]
        for d in g.journal.damage:
            if d.repaired_at is not None:
                continue
            mend, cursor = self._mends.get(d.key()) or (
                damage.Mend(damage.needs(d, sizes)), (d.segment, d.end))
            at: Optional[Position] = (d.segment, d.end) if mend.done else None
            if at is None:
                for segno, e in entries_from(g.journal, cursor):
                    cursor = (segno, e[8] + 1)
                    if e[1] < KIND_CHECKPOINT and mend.feed(e[0], e[1], e[3], e[5], e[6],
                                                            e[4]):
                        at = (segno, e[8] + RECORD.size + (e[4] if e[1] in DATA_KINDS
                                                           else 0))
                        break
            self._mends[d.key()] = (mend, cursor)
            if at is not None:
                d.repaired_at = list(at)
                d.repaired_points = [[k, gen, seq]
                                     for k, (gen, seq) in sorted(mend.points.items())]
                self._mends.pop(d.key(), None)
                changed = True
                log.warning("group %s: repaired: %s is covered by the records journaled "
                            "up to segment %d byte %d; points from there on restore again",
                            g.name, g.journal.describe(d), at[0], at[1])
        if changed:
            g.journal.save_damage()

    def asks(self, g: GroupData) -> Asks:
        """The disk ranges to ask the source for again, for damage found since the last
        call (each damage asked once per agent run; a restart asks again)."""
        self.follow(g)
        out: Asks = []
        for d in g.journal.damage:
            if d.repaired_at is not None or d.key() in self._asked:
                continue
            self._asked.add(d.key())
            mend = self._mends.get(d.key())
            out.extend(sorted((mend[0].asks() if mend else {}).items()))
        out.extend(self.replica_asks)
        self.replica_asks = []
        return out


def check_intact(g: GroupData, c: Optional[Checkpoint]) -> None:
    """JournalCorrupt if the point (a checkpoint, None: the newest) needs damaged records
    (see the module)."""
    if g.journal.damage_from(g.applied) is None:
        return
    marker = None
    if c is not None:
        for segno, e in entries_from(g.journal, g.applied):
            if e[1] == KIND_CHECKPOINT and e[7] == c.time_ns:
                marker = (segno, e[8])
                break
    points = list(c.cut) if c is not None else g.newest()[0]
    for d in g.journal.damage:
        if d.key() < g.applied or (marker is not None and marker <= d.key()):
            continue
        if d.covers(points):
            continue
        if d.repaired_at is None:
            raise g.journal.corrupt(d)
        seg, at = d.repaired_at
        raise JournalCorrupt("%s; repaired from segment %d byte %d on: this point lies in "
                             "the gap before it" % (g.journal.describe(d), seg, at),
                             g.journal.path(d.segment), d)
