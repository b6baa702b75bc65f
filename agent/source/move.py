"""A planned move (``ferry move G``): the group goes live on its target site with nothing lost.

Theory of operation
-------------------
1. Site A fences its own splitters for the group (they refuse writes with EROFS, EPERM on
   the NBD wire): from here the VM can change nothing, so what follows is final.
2. It waits until site B has acked every write the VM saw complete (``wait_synced``).
3. It cuts a checkpoint of kind ``move``. Site B journals it like any checkpoint and, once
   it has acked it, fails the group over live at exactly that checkpoint and ends the
   session (``target/server.py``); the next contact answers ``failed-over``, which keeps the
   splitters fenced (``shipper.py``).
4. A waits to hear that answer and reports: the checkpoint, each disk's last write, and the
   writes lost (none: step 2 proved B held them all before the cut).

Anything that fails before site B failed over lifts the fence again (the VM writes on as
before) and says why; the group keeps replicating.
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import trio

from ..errors import Conflict, NotFound, TimedOut
from .states import ShipperState

log = logging.getLogger("ferry.source")


async def move(site: Any, name: str, seconds: float) -> Dict[str, Any]:
    """Move group ``name`` to its target site (see the module); ``site`` is the SourceSite."""
    shipper = site.shippers.get(name)
    if shipper is None:
        raise NotFound("no group %s on this site" % name)
    if shipper.state is ShipperState.FENCED:
        raise Conflict("group %s is fenced already: %s" % (name, shipper.fenced))
    if not shipper.live:
        raise Conflict("group %s is not replicating (%s): a move needs a live link to its "
                       "target" % (name, shipper.state.value))
    links = shipper.links
    reason = "group %s is moving to %s (ferry move)" % (name, shipper.row.target)
    log.warning("%s: fencing its splitters, then the last writes go out", reason)
    for link in links:
        await link.fence(reason)
    try:
        synced = await site.wait_synced(name, seconds)
        cut = await site.checkpoint(name, "move", seconds, kind="move")
        if not cut.get("acked"):
            raise TimedOut("group %s: the move checkpoint was not journaled by %s within "
                           "%g s" % (name, shipper.row.target, seconds))
        with trio.move_on_after(seconds):
            while shipper.state is not ShipperState.FENCED:  # noqa: ASYNC110 (polled)
                await trio.sleep(0.05)
        if shipper.state is not ShipperState.FENCED:
            raise TimedOut("group %s: %s journaled the move checkpoint but did not say it "
                           "failed over within %g s" % (name, shipper.row.target, seconds))
    except BaseException:
        if shipper.state is not ShipperState.FENCED:
            for link in links:
                await link.fence(None)
            log.warning("group %s: move aborted; its splitters take writes again", name)
        raise
    log.warning("group %s MOVED to %s at checkpoint %s; nothing lost", name,
                shipper.row.target, cut["id"])
    return {"group": name, "moved": True, "target": shipper.row.target,
            "checkpoint": cut["id"], "cut": cut["cut"], "last_writes": synced["disks"],
            "lost_writes": 0}
