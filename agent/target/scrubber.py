"""The periodic slow scrub: every replica chunk of every group checked against its digest
(``digests.py``) in the background, one chunk at a time, the group's lock held for that
chunk only.

Theory of operation
-------------------
One task walks the chunks of every group's replicas in turn, forever. It paces itself so
that a whole pass over everything this site holds takes ``period`` seconds (default one
day), and never reads faster than ``rate`` bytes a second: the wait before each chunk is the
longer of ``period / chunks`` and ``CHUNK / rate``. A damaged chunk is asked of the source
at once (``on_damage``: the same repair as ``ferry scrub``); at the end of a group's pass
its findings are published (``on_pass``) as the group's ``last_scrub``. A group opened or
closed meanwhile is picked up or dropped at the next pass; a chunk that cannot be read is
logged and the pass goes on.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import trio

from .digests import CHUNK, merge

log = logging.getLogger("ferry.target")

DEFAULT_PERIOD = 24 * 3600.0
DEFAULT_RATE = 16 * 1024 * 1024


class Scrubber:
    def __init__(self, groups: Callable[[], Dict[str, Any]],
                 on_damage: Callable[[str, int, List[Tuple[int, int]]], None],
                 on_pass: Callable[[str, Dict[str, Any]], None],
                 period: float = DEFAULT_PERIOD, rate: float = DEFAULT_RATE) -> None:
        self.groups, self.on_damage, self.on_pass = groups, on_damage, on_pass
        self.period, self.rate = period, rate
        self.running: Dict[str, Dict[str, Any]] = {}  # group -> its pass so far

    def interval(self, chunks: int) -> float:
        """Seconds to wait before each chunk (see the module)."""
        return max(self.period / max(1, chunks), CHUNK / self.rate if self.rate else 0.0)

    async def run(self) -> None:
        while True:
            groups = dict(self.groups())
            chunks = sum(d.chunks for g in groups.values() for d in g.digests)
            if not chunks:
                await trio.sleep(min(60.0, self.period))
                continue
            wait = self.interval(chunks)
            for name, g in sorted(groups.items()):
                await self._pass(name, g, wait)

    async def _pass(self, name: str, g: Any, wait: float) -> None:
        found: Dict[str, Any] = {"time": None, "started": time.time(), "periodic": True,
                                 "group": name, "disks": {}, "repair_asked": False}
        self.running[name] = found
        try:
            for i, digests in enumerate(list(g.digests)):
                disk = g.disks[i].name
                out: Dict[str, Any] = {"checked_chunks": 0, "baseline_chunks": 0,
                                       "damaged": []}
                found["disks"][disk] = out
                baseline: List[int] = []
                for c in range(digests.chunks):
                    await trio.sleep(wait)
                    if self.groups().get(name) is not g or not getattr(g, "fds", None):
                        return  # closed or replaced: the next pass takes the new one
                    result = await trio.to_thread.run_sync(self._check, g, i, c)
                    if result == "baseline":
                        baseline.append(c)
                        out["baseline_chunks"] += 1
                    elif result == "checked":
                        out["checked_chunks"] += 1
                    elif result == "damaged":
                        offset, length = digests.chunk_range(c)
                        merge(out["damaged"], offset, length)
                        found["repair_asked"] = True
                        log.error("group %s: the periodic scrub found the replica of %s "
                                  "damaged at %d+%d; asked the source for it again", name,
                                  disk, offset, length)
                        self.on_damage(name, i, [(offset, length)])
                try:
                    await trio.to_thread.run_sync(digests.save, baseline)
                except Exception as e:  # a StorageError naming the digests file
                    log.error("group %s: periodic scrub: %s", name, e)
            found["time"] = time.time()
            found["disks"] = {k: dict(v, damaged=[list(r) for r in v["damaged"]])
                              for k, v in found["disks"].items()}
            self.on_pass(name, found)
        finally:
            self.running.pop(name, None)

    @staticmethod
    def _check(g: Any, i: int, c: int) -> Optional[str]:
        with g._lock:
            if not g.fds:
                return None
            try:
                return str(g.digests[i].check(g.fds[i], c))
            except OSError as e:
                log.error("group %s: periodic scrub: %s: %s", g.name,
                          g.replica_path(g.disks[i].name), e.strerror or e)
                return None
