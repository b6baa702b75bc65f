"""Failback (``ferry failback G``, on the site where G is failed over live): this site takes
the source role of G and protects its live disks back to the old source, onto that site's
original disks, shipping only the chunks that differ.

Theory of operation
-------------------
1. The failover must be committed: failback makes the live disks the group's truth, which a
   rollback would throw away. One failback of a group at a time, and none while this site
   already protects a group of that name.
2. The failover record gets a ``failback`` entry (saved): from now on ``views.py`` no longer
   serves the live disks, and the live export is stopped.
3. The live disks are protected to the old source as group G, each disk's seed given as
   ``target/failback.IN_PLACE``: that site adopts its own original disks as the replicas,
   in place, but only while its source role of G is fenced (``fenced_disks``), and sends
   their chunk digests. The splitters now serve the live disks on the live export's own
   sockets (the VM's NBD client reconnects to the URI it had; ``views.py`` leaves that
   directory, marked ``SPLITTERS``, alone) and they record every write before the
   initial sync reads a byte, so no write falls between the digest comparison and
   continuous shipping. The sync compares every chunk: what B's VM wrote since the
   failover and what A's VM wrote that B never received (A's queue and dirty map at the
   fence) both differ, and both are shipped; nothing else is.
4. It waits (unless told not to) until the old source holds everything, and reports the
   bytes shipped against the disks' size; the same figures stay in the failover record.

Anything that fails before the protection exists takes the ``failback`` entry back and
serves the live disks again, as before. ``ferry move G`` then brings the old source live
on its original disks (``source/move.py``, ``target/failover.py``).
"""

from __future__ import annotations

import logging
import os
import time
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import trio

from formats.durable import fsync_dir

from ..disks import Identity, identity
from ..errors import Conflict, Invalid
from ..seed import SeedError
from ..target import failover as fo
from ..target import live, splitbrain
from ..target.failback import IN_PLACE, SPLITTERS
from .states import ShipperState

if TYPE_CHECKING:
    from ..target.server import TargetSite
    from .site import SourceSite

log = logging.getLogger("ferry.source")


def own_disk(name: str, path: str) -> Tuple[str, int, Identity]:
    """A live disk this agent made (in its data directory, which ``Policy`` refuses to
    users): its real path, size and identity."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
    except OSError as e:
        raise Invalid("live disk %s: %s: %s" % (name, path, e.strerror or e)) from None
    try:
        return os.path.realpath(path), os.lseek(fd, 0, os.SEEK_END), identity(os.fstat(fd))
    finally:
        os.close(fd)


def splitter_sockets(views_root: str, name: str, disks: List[str]) -> Dict[str, str]:
    """The live export's sockets, for the splitters that serve the live disks from now on
    (the VM's NBD client reconnects to the URI it had): its directory, marked as the
    splitters' (``views.py`` leaves it alone)."""
    directory = os.path.join(views_root, "live-" + name)
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, SPLITTERS), "w") as f:
        f.write("the splitters of group %s's failback serve its live disks here\n" % name)
    fsync_dir(directory)
    return {d: os.path.join(directory, d + ".sock") for d in disks}


def fenced_disks(site: SourceSite, name: str, keep: bool = False) -> Dict[str, str]:
    """This site's original disks of group ``name``, which a failback may adopt in place:
    only while the group is fenced here (SeedError naming why not). ``keep``: they are
    about to be adopted; if they hold split-brain writes, copy them to ``<data>/kept/``
    first (``target/splitbrain.py``)."""
    row = site.store.group(name)
    shipper = site.shippers.get(name)
    if row is None or shipper is None:
        raise SeedError("group %s is not protected from this site: it has no original "
                        "disks to fail back onto" % name)
    formats = row.settings.get("formats") or {}
    for dname, fmt in sorted(formats.items()):
        if fmt != "raw":
            # In place, the replica's bytes are the guest's view; a qcow2 or VMDK file is not.
            raise SeedError("group %s disk %s is a %s image: failing back onto it in place is "
                            "not supported; restore the point with ferry restore --format %s "
                            "instead" % (name, dname, fmt, fmt))
    if shipper.state is not ShipperState.FENCED:
        raise SeedError("group %s is %s on this site, not fenced: its disks may take "
                        "writes, so a failback onto them is refused"
                        % (name, shipper.state.value))
    disks = {d.name: d.path for d in row.disks}
    sb = shipper.split_brain
    if keep and sb is not None and not sb.get("kept"):
        try:
            sb["kept"] = splitbrain.keep(site.data_dir, name, disks)
        except (Conflict, OSError) as e:
            raise SeedError("group %s: its split-brain writes cannot be kept before the "
                            "failback: %s" % (name, e)) from None
    return disks


def check(target: TargetSite, source: SourceSite, name: str) -> None:
    """Refuse a failback this site cannot start (Conflict, NotFound), naming why."""
    g = target.group(name)
    state = fo.state_of(g.failover)
    if state is fo.State.NONE:
        raise Conflict("group %s is not failed over here (replicating); nothing to fail "
                       "back" % name)
    sb = splitbrain.unresolved(g)
    if sb is not None:
        raise Conflict("group %s has a split brain: site A holds %d bytes of writes this "
                       "site never received; pick the survivor first (ferry resolve %s "
                       "--keep a|b)" % (name, sb["a_unreplicated_bytes"], name))
    if state is fo.State.DONE:
        raise Conflict("group %s %s; commit it first (ferry failover %s --commit): a "
                       "failback makes its live disks the truth" % (name, fo.describe(g), name))
    assert g.failover is not None
    if state is not fo.State.COMMITTED or "live" not in g.failover:
        raise Conflict("group %s %s, with no live disks of its own to fail back (a commit "
                       "under way, or failed over by an earlier Ferry)" % (name, fo.describe(g)))
    row = source.store.group(name)
    if row is not None:
        raise Conflict("group %s is failing back already: this site protects it to %s "
                       "(ferry status %s)" % (name, row.target, name))


def returning(target: TargetSite, name: str) -> bool:
    """Whether ``ferry failback`` of ``name`` here is the return leg: this site's replica of
    it is a failback's, live on this site's original disks."""
    g = target.groups.get(name)
    return g is not None and bool((g.failover or {}).get("in_place"))


async def resume(source: SourceSite, target: TargetSite, name: str, seconds: float,
                 wait: bool = True) -> Dict[str, Any]:
    """The return leg (see the module): protect this site's original disks to the site
    that failed them back, as a new protection whose seeds are that site's live disks in
    place; the reverse group here ends."""
    async with live.lock(name):
        g = target.group(name)
        row = source.store.group(name)
        shipper = source.shippers.get(name)
        if row is None or shipper is None or shipper.state is not ShipperState.FENCED \
                or shipper.paused:
            raise Conflict("group %s %s, but its protection from this site is %s: only a "
                           "fenced protection, not paused, starts again (unprotected: "
                           "protect its disks anew)" % (
                               name, fo.describe(g), "gone" if shipper is None else "paused"
                               if shipper.paused else shipper.state.value))
        settings = {k: v for k, v in row.settings.items() if k != "seeds"}
        settings["seeds"] = {d.name: IN_PLACE for d in row.disks}
        await trio.to_thread.run_sync(g.failover_set, "failback", {"state": "returning"})
        await trio.to_thread.run_sync(target.views.stop_live, name)
        target.groups.pop(name, None)
        await trio.to_thread.run_sync(g.remove)  # links to the original disks, never them
        log.warning("group %s: the reverse group ends; its disks are protected to %s again",
                    name, row.target)
        info = await source.renew(name, settings)
    if wait:
        await source.wait_synced(name, seconds)
    report = shipped(source, name)
    return dict(report, group=name, target=row.target, synced=True if wait else None,
                returned=True,
                disks={d["name"]: dict(report["disks"][d["name"]], nbd_uri=d["nbd_uri"])
                       for d in info["disks"]})


async def failback(source: SourceSite, target: TargetSite, name: str,
                   address: Optional[str], seconds: float, wait: bool = True
                   ) -> Dict[str, Any]:
    """Fail group ``name`` back to ``address`` (see the module), or, where it came back
    already, protect it again to the site it came from (``resume``)."""
    if returning(target, name):
        return await resume(source, target, name, seconds, wait)
    if address is None:
        raise Invalid("failback of group %s needs --target HOST:PORT: the old source's "
                      "replication address" % name)
    async with live.lock(name):
        check(target, source, name)
        g = target.group(name)
        disks = [(d.name, fo.live_path(g, d.name)) for d in g.disks]
        record: Dict[str, Any] = {"target": address, "started_ns": time.time_ns(),
                                  "state": "starting",
                                  "size": sum(d.size for d in g.disks)}
        await trio.to_thread.run_sync(g.failover_set, "failback", dict(record))
        await trio.to_thread.run_sync(target.views.stop_live, name)
        sockets = await trio.to_thread.run_sync(splitter_sockets, target.views.root, name,
                                                [d for d, _p in disks])
        try:
            info = await source.protect(name, disks, address,
                                        seeds={d: IN_PLACE for d, _p in disks}, own=True,
                                        sockets=sockets)
        except BaseException:
            with trio.CancelScope(shield=True):
                await trio.to_thread.run_sync(g.failover_set, "failback", None)
                await trio.to_thread.run_sync(target.views.serve_live, g)
            log.warning("group %s: failback to %s not started; its live export serves "
                        "again", name, address)
            raise
        record["state"] = "protecting"
        await trio.to_thread.run_sync(g.failover_set, "failback", dict(record))
    log.warning("group %s: FAILING BACK to %s; its live disks are served by splitters now "
                "(%s)", name, address, ", ".join("%s %s" % (d["name"], d["nbd_uri"])
                                                 for d in info["disks"]))
    synced: Optional[bool] = None
    if wait:
        await source.wait_synced(name, seconds)
        synced = True
    report = shipped(source, name)
    if synced:
        record.update(state="synced", bytes_shipped=report["bytes_shipped"],
                      synced_ns=time.time_ns())
        await trio.to_thread.run_sync(g.failover_set, "failback", dict(record))
    return dict(report, group=name, target=address, synced=synced,
                disks={d["name"]: dict(report["disks"][d["name"]], nbd_uri=d["nbd_uri"])
                       for d in info["disks"]})


def shipped(source: SourceSite, name: str) -> Dict[str, Any]:
    """What the failback of ``name`` has shipped so far, against the disks' size."""
    row = source.store.group(name)
    assert row is not None
    disks = {}
    for d in row.disks:
        link = source.links[d.id]
        disks[d.name] = {"size": d.size, "bytes_shipped": link.shipped_bytes,
                         "resync_skipped_bytes": link.resync_skipped_bytes}
    return {"size": sum(v["size"] for v in disks.values()),
            "bytes_shipped": sum(v["bytes_shipped"] for v in disks.values()),
            "disks": disks}
