"""A live failover's commit and rollback, as the API asks them: the group's step
(``failover.py``, in a worker thread) and its export's (``views.py``), in that order.

A rollback is saved before the export stops and finished after, so the live disks are never
deleted under a running export; one commit or rollback of a group runs at a time (a second
waits, then finds the state changed and says so).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict

import trio

if TYPE_CHECKING:
    from .server import TargetSite

_busy: Dict[str, trio.Lock] = {}


def lock(name: str) -> trio.Lock:
    """The lock of group ``name``'s live steps (commit, rollback, failback)."""
    return _busy.setdefault(name, trio.Lock())


async def commit(site: TargetSite, name: str) -> Dict[str, Any]:
    g = site.group(name)
    async with lock(name):
        record = await trio.to_thread.run_sync(g.failover_commit)
    view = site.views.live_of(name)
    return {"group": name, "failover": record, "disks": dict(view.disks) if view else {}}


async def rollback(site: TargetSite, name: str) -> Dict[str, Any]:
    g = site.group(name)
    async with lock(name):
        await trio.to_thread.run_sync(g.failover_rollback)
        await trio.to_thread.run_sync(site.views.stop_live, name)
        record = await trio.to_thread.run_sync(g.failover_rolled_back)
    return {"group": name, "failover": record}
