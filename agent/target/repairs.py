"""Ranges site B asks its source to send again: the repair of a damaged or missing copy.

Whoever finds site B's copy of a range wrong (the administrator's ``ferry repair``, and
later a scrub or a damaged journal record) queues it here, per group; the group's session
sends what is queued with its next ACK (``messages.Ack.repair``; an idle session's ping is
answered every few seconds, so a request goes out within the heartbeat), and the source's
splitter reads the ranges back from the disk and ships them like any resync. Kept in memory:
a request made while no session is open goes with the next one; one lost with the agent
is found again by whatever found it first.
"""

from __future__ import annotations

from typing import Dict, List, Tuple

from ..protocol.messages import MAX_REPAIRS, Repair


class Repairs:
    def __init__(self) -> None:
        self._queued: Dict[str, List[Repair]] = {}

    def request(self, group: str, disk: int, ranges: List[Tuple[int, int]]) -> None:
        queued = self._queued.setdefault(group, [])
        for o, n in ranges:
            if (disk, o, n) not in queued:  # found twice before it went: asked once
                queued.append((disk, o, n))

    def take(self, group: str) -> Tuple[Repair, ...]:
        """What one ACK carries (at most MAX_REPAIRS ranges), taken off the queue."""
        queued = self._queued.get(group)
        if not queued:
            return ()
        out, self._queued[group] = queued[:MAX_REPAIRS], queued[MAX_REPAIRS:]
        return tuple(out)

    def pending(self, group: str) -> int:
        return len(self._queued.get(group, ()))

    def forget(self, group: str) -> None:
        self._queued.pop(group, None)
