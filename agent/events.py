"""Every change of state, as numbered events: what ``ferry events`` and ``/v1/events`` show.

An event is a JSON object: ``{"id", "time", "kind", "severity", "group"?, ...}``. Ids grow
strictly, also across agent restarts (they start from the agent's start time in
microseconds), so a consumer resumes with ``after=<last id it saw>``. The log keeps the last
``KEEP`` events in memory; a consumer that fell further behind is told (``lost``).

Kinds: ``group`` (protected, unprotected, state), ``disk`` (state), ``resync`` (start, end),
``link`` (up, down), ``checkpoint`` (a user's, not the automatic ones), ``failover`` (test
started or stopped, live), ``alert`` (raised, cleared), ``job`` (started, done, failed),
``agent`` (started).

Most events are found by comparing two status samples (watch.py, every 0.5 s), so a state
shorter than a sample can go unseen. What must never be missed is told where it happens:
a test failover's start and stop (``TargetSite.notify``) and the ``journal-full`` alert of a
refused write (``Watcher.journal_refused``, from site B's server and the source's shipper).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from typing import Any, Deque, Dict, List, Optional, Tuple

import trio

KEEP = 10000
SEVERITIES = ("info", "warning", "error")


class EventLog:
    def __init__(self, keep: int = KEEP, clock: Any = time.time) -> None:
        self._events: Deque[Dict[str, Any]] = deque(maxlen=keep)
        self._clock = clock
        self.last_id = int(clock() * 1e6)
        self.first_id = self.last_id + 1
        self.counts: Counter = Counter()
        self._changed = trio.Event()

    def emit(self, kind: str, severity: str = "info", **fields: Any) -> Dict[str, Any]:
        assert severity in SEVERITIES, severity
        assert not {"id", "time", "kind", "severity"} & set(fields), fields
        self.last_id += 1
        event = {"id": self.last_id, "time": round(self._clock(), 3), "kind": kind,
                 "severity": severity, **fields}
        self._events.append(event)
        self.counts[kind] += 1
        self._changed.set()
        self._changed = trio.Event()
        return event

    def since(self, after: int, limit: int = 1000) -> Tuple[List[Dict[str, Any]], bool]:
        """Events with an id above ``after`` (at most ``limit``), and whether some were lost
        (``after`` is older than the oldest event kept, and not from before this agent)."""
        oldest = self._events[0]["id"] if self._events else self.last_id + 1
        lost = self.first_id <= after + 1 < oldest
        out = [e for e in self._events if e["id"] > after][:limit]
        return out, lost

    async def wait(self, after: int, wait_s: float, limit: int = 1000
                   ) -> Tuple[List[Dict[str, Any]], bool]:
        """As ``since``, waiting up to ``wait_s`` seconds for one when there is none yet."""
        with trio.move_on_after(wait_s):
            while True:
                events, lost = self.since(after, limit)
                if events or lost:
                    return events, lost
                await self._changed.wait()
        return self.since(after, limit)

    def latest(self, n: int, kind: Optional[str] = None) -> List[Dict[str, Any]]:
        items = [e for e in self._events if kind is None or e["kind"] == kind]
        return items[-n:]
