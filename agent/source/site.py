"""The groups this site protects (the source role of each) and the requests on them.

``SourceSite`` keeps a group's registry (its row in the store, its ``GroupShipper``, its
disks' ``DiskLink``s), serves the splitters' socket (``intake``), keeps the splitters
running (``splitters.Fleet``), and answers the control API: protect, unprotect, wait until
synced, cut a checkpoint, pause, limit bandwidth, status. Shipping itself is the shipper's
business (``shipper.py``); this module only starts and stops shippers and asks them.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Set, Tuple

import trio

from formats import images
from formats import localwire as lw

from .. import inuse
from ..disks import Identity, Policy, identity
from ..errors import Conflict, Invalid, NotFound, TimedOut, Unavailable
from ..store import DiskRow, GroupRow, Store
from ..target.failback import IN_PLACE
from . import intake, status
from .failback import own_disk
from .handshake import Connector, plain_connect, probe
from .link import DiskLink
from .settings import DEFAULT_QUEUE, DEFAULT_SETTINGS, NAME_RE, parse_target
from .shipper import GroupShipper
from .splitters import Fleet, SplitterError

log = logging.getLogger("ferry.source")
REOPEN_WAIT = 10.0  # seconds a checkpoint waits for a session reopened on purpose

SUPERVISE_INTERVAL = 2.0


class SourceSite:
    def __init__(self, data_dir: str, store: Store, connect: Connector = plain_connect,
                 policy: Optional[Policy] = None) -> None:
        self.data_dir = data_dir
        self.store = store
        self.policy = policy if policy is not None else Policy(data_dir)
        self.connect = connect
        self.site_id = store.site_id()
        self.socket_path = os.path.join(data_dir, "splitter.sock")
        self.fleet = Fleet(data_dir, self.socket_path)
        self.links: Dict[str, DiskLink] = {}
        self.shippers: Dict[str, GroupShipper] = {}
        self._nursery: Optional[trio.Nursery] = None
        self._busy: Set[str] = set()
        self.idents: Dict[str, List[Identity]] = {}  # group -> its disks' identities
        # What each shipper tells as it happens (set by the agent: Watcher.journal_*)
        self.journal_refused: Callable[[str, str, str], Any] = lambda *args: None
        self.journal_resumed: Callable[[str, str], Any] = lambda *args: None
        for row in store.groups():
            self._claim_stored(row)

    def _claim_stored(self, row: GroupRow) -> None:
        """Claim the disks of a group protected before this start (by what their paths
        reach now; a disk that is gone claims nothing)."""
        idents = self.idents.setdefault(row.name, [])
        for d in row.disks:
            try:
                ident = identity(os.stat(d.path))
                self.policy.claim(ident, row.name, d.name, d.path)
            except (OSError, Conflict) as e:
                log.warning("group %s disk %s: %s", row.name, d.name, e)
                continue
            idents.append(ident)

    # -- serving -------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Serve splitters and ship every protected group until cancelled."""
        listener = await intake.bind(self.socket_path)
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for row in self.store.groups():
                self._start_group(row)
                await trio.to_thread.run_sync(self.fleet.ensure, row)
            task_status.started()
            nursery.start_soon(self._supervise)
            await intake.serve(listener, self.links.get)

    async def _supervise(self) -> None:
        """Restart a splitter that died (qemu's NBD client reconnects to the new one)."""
        while True:
            await trio.sleep(SUPERVISE_INTERVAL)
            for name in list(self.shippers):
                row = self.store.group(name)
                if row is None or name in self._busy:
                    continue
                dead = self.fleet.dead(row)
                if dead:
                    log.warning("group %s: splitter for %s is not running; restarting it",
                                name, ", ".join(d.name for d in dead))
                    await trio.to_thread.run_sync(self.fleet.ensure, row)

    def _start_group(self, row: GroupRow) -> None:
        sockets = row.settings.get("sockets") or {}  # a failback's: the live export's
        for d in row.disks:
            if d.name in sockets:
                self.fleet.sockets[d.id] = sockets[d.name]
        links = [DiskLink(d) for d in row.disks]
        for link in links:
            self.links[link.row.id] = link
        shipper = GroupShipper(row, self.site_id, links, self.connect)
        shipper.journal_refused = lambda *args: self.journal_refused(*args)
        shipper.journal_resumed = lambda *args: self.journal_resumed(*args)
        self.shippers[row.name] = shipper
        assert self._nursery is not None
        self._nursery.start_soon(shipper.run)

    def _stop_group(self, row: GroupRow) -> None:
        shipper = self.shippers.pop(row.name, None)
        if shipper is not None:
            shipper.cancel_scope.cancel()
        for d in row.disks:
            self.links.pop(d.id, None)

    # -- requests ------------------------------------------------------------------------

    async def protect(self, name: str, disks: List[Tuple[str, str]], target: str,
                      queue_bytes: int = DEFAULT_QUEUE,
                      allow_unreachable: bool = False,
                      settings: Optional[Dict[str, Any]] = None,
                      seeds: Optional[Dict[str, str]] = None,
                      own: bool = False,
                      sockets: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """``seeds``: {disk name: a file on site B to start its replica from}. ``own``: the
        disks are this agent's live disks, failing back (``failback.py``), served on
        ``sockets`` (disk name -> the live export's socket)."""
        if not NAME_RE.match(name):
            raise Invalid("group name %r: use letters, digits, '_', '.', '-'" % name)
        if name in self._busy or self.store.group(name) is not None:
            raise Conflict("group %s already exists" % name)
        parse_target(target)
        if not disks:
            raise Invalid("a group needs at least one --disk")
        rows: List[Tuple[str, str, int]] = []
        idents: List[Identity] = []
        formats: Dict[str, str] = {}
        for dname, path in disks:
            if not NAME_RE.match(dname):
                raise Invalid("disk name %r: use letters, digits, '_', '.', '-'" % dname)
            if dname in [r[0] for r in rows]:
                raise Invalid("disk name %s is given twice" % dname)
            real, size, ident = await trio.to_thread.run_sync(
                own_disk if own else self.policy.open_disk, dname, path)
            if ident in idents:
                raise Invalid("disk %s: %s is the same disk as disk %s"
                              % (dname, path, rows[idents.index(ident)][0]))
            if size == 0:
                raise Invalid("disk %s: %s is empty" % (dname, path))
            await trio.to_thread.run_sync(inuse.refuse_if_in_use, dname, real)
            image = await trio.to_thread.run_sync(self._inspect, dname, real)
            size = image.virtual_size
            if image.format != images.RAW:  # pinned: the splitter never probes
                formats[dname] = image.format
            rows.append((dname, real, size))
            idents.append(ident)
        seen = {r[0] for r in rows}
        for dname, path in (seeds or {}).items():
            if dname not in seen:
                raise Invalid("a seed for disk %s, which group %s does not have"
                              % (dname, name))
            if not path.startswith("/") and not (own and path == IN_PLACE):
                raise Invalid("seed %s for disk %s: give the absolute path of a file on "
                              "site B" % (path, dname))
        if seeds:
            settings = dict(settings or {}, seeds=dict(seeds))
        if formats:
            settings = dict(settings or {}, formats=formats)
        if own and sockets:
            settings = dict(settings or {}, sockets=dict(sockets))
        if name in self._busy or self.store.group(name) is not None:
            raise Conflict("group %s already exists" % name)
        # From here to the claims' end nothing awaits: of concurrent claims one wins.
        claimed: List[Identity] = []
        try:
            for (dname, path), ident in zip(disks, idents):
                self.policy.claim(ident, name, dname, path)
                claimed.append(ident)
        except Conflict:
            for ident in claimed:
                self.policy.release(ident, name)
            raise
        self._busy.add(name)
        ok = False
        try:
            row = GroupRow(name, target, uuid.uuid4().hex, queue_bytes, time.time(),
                           [DiskRow("", name, i, d, p, s) for i, (d, p, s) in enumerate(rows)],
                           dict(settings or {}))
            await probe(self.connect, row, self.site_id, allow_unreachable)
            row = self.store.add_group(name, target, queue_bytes, rows,
                                       protection=row.protection, settings=row.settings)
            self._start_group(row)  # ready for the splitters before they start
            try:
                await trio.to_thread.run_sync(self._start_splitters_or_fail, row)
            except BaseException:
                self._stop_group(row)
                self.store.remove_group(name)
                raise
            ok = True
        finally:
            self._busy.discard(name)
            if ok:
                self.idents[name] = claimed
            else:
                for ident in claimed:
                    self.policy.release(ident, name)
        log.info("protected group %s: %s -> %s", name,
                 ", ".join("%s=%s" % (d.name, d.path) for d in row.disks), target)
        return status.group_info(row, self.fleet)

    def _inspect(self, dname: str, real: str) -> images.Image:
        """The disk's format (by its content) and virtual size, or Invalid in one line."""
        try:
            return images.inspect(real, lambda what, path: self.policy.check_name(
                "disk %s: %s" % (dname, what), path))
        except images.Unsupported as e:
            raise Invalid("disk %s: %s" % (dname, e)) from None
        except OSError as e:
            raise Invalid("disk %s: %s: %s" % (dname, real, e.strerror or e)) from None

    def _start_splitters_or_fail(self, row: GroupRow) -> None:
        try:
            self.fleet.start_all(row)
        except (SplitterError, OSError) as e:
            raise Unavailable("cannot start the splitter: %s" % e) from None

    async def unprotect(self, name: str) -> Dict[str, Any]:
        row = self.store.group(name)
        if row is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        self._busy.add(name)  # the supervisor leaves it alone from now on
        self._stop_group(row)
        try:
            await trio.to_thread.run_sync(self.fleet.stop_all, row)
            self.store.remove_group(name)
            for ident in self.idents.pop(name, []):
                self.policy.release(ident, name)
        finally:
            self._busy.discard(name)
        log.info("unprotected group %s", name)
        return {"group": name, "disks": [d.name for d in row.disks]}

    async def renew(self, name: str, settings: Dict[str, Any]) -> Dict[str, Any]:
        """Start group ``name``'s protection over (failback's return leg, ``failback.py``):
        a new protection, its splitters restarted on the same sockets with no state (they
        read their whole disks again, compared by digest when ``settings`` has seeds), no
        fence."""
        row = self.store.group(name)
        if row is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        self._busy.add(name)
        try:
            self._stop_group(row)
            await trio.to_thread.run_sync(self.fleet.stop_all, row)
            self.store.renew(name, uuid.uuid4().hex, settings)
            row = self.store.group(name)
            assert row is not None
            self._start_group(row)
            await trio.to_thread.run_sync(self._start_splitters_or_fail, row)
        finally:
            self._busy.discard(name)
        log.warning("group %s: protected again from this site, to %s (a new protection)",
                    name, row.target)
        return status.group_info(row, self.fleet)

    async def wait_synced(self, name: str, seconds: float) -> Dict[str, Any]:
        """Return once the target holds every write made before the call."""
        row = self.store.group(name)
        if row is None:
            raise NotFound("no group %s on this site" % name)
        links = [self.links[d.id] for d in row.disks]
        token = uuid.uuid4().hex
        points: Dict[str, Tuple[int, int]] = {}
        asked: Dict[str, Any] = {}
        with trio.move_on_after(seconds):
            while True:
                for link in links:
                    if link.row.id in points:
                        continue
                    reply = link.sync_replies.pop(token, None)
                    if reply is not None:
                        points[link.row.id] = reply
                    elif link.connected and asked.get(link.row.id) is not link.stream:
                        asked[link.row.id] = link.stream
                        await link.send(lw.pack_json(lw.MSG_SYNC_REQ, {"token": token}))
                if len(points) == len(links) and all(
                        link.covers(points[link.row.id]) for link in links):
                    return {"group": name, "synced": True,
                            "disks": {link.row.name: list(points[link.row.id])
                                      for link in links}}
                await trio.sleep(0.02)
        behind = []
        for link in links:
            if link.row.id not in points:
                behind.append("%s: %s" % (link.row.name, "splitter not connected"
                                          if not link.connected else "resync still running"))
            elif link.acked < points[link.row.id]:
                behind.append("%s: target acked %d/%d of %d/%d" % (
                    (link.row.name,) + link.acked + points[link.row.id]))
        raise TimedOut("group %s not synced after %g s (%s)"
                       % (name, seconds, "; ".join(behind)))

    async def checkpoint(self, name: str, tag: Optional[str], seconds: float,
                         kind: str = "user", cut: Optional[trio.Event] = None
                         ) -> Dict[str, Any]:
        """Cut a user checkpoint (or a move's, ``move.py``, or an application-consistent
        one, ``agent/domains/quiesce.py``) and wait until the target has journaled it;
        ``cut`` is set as soon as it is cut (or cannot be)."""
        shipper = self.shippers.get(name)
        if shipper is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        if tag is not None and (not tag or len(tag) > 256 or "\n" in tag):
            raise Invalid("a tag is 1 to 256 characters on one line")
        # A session reopened on purpose (new settings or domain definitions for site B)
        # is down for a moment while the group still says replicating: wait that out.
        with trio.move_on_after(min(seconds, REOPEN_WAIT)):
            while not shipper.live and shipper.state.value == "replicating":  # noqa: ASYNC110 (no event tells it)
                await trio.sleep(0.05)
        if not shipper.live:
            raise Conflict("group %s is not replicating (%s): no checkpoint can be cut "
                           "now" % (name, shipper.state.value))
        bad = [d.name for d in shipper.row.disks if self.links[d.id].inconsistent]
        if bad:
            raise Conflict("group %s: disk %s is being resynced; a crash-consistent "
                           "checkpoint is possible once it ends" % (name, bad[0]))
        book = shipper.book
        req = book.request(kind, tag)
        cid = req.checkpoint.id
        event = book.waiters[cid]
        if cut is not None:
            book.cut_waiters[cid] = cut
        with trio.move_on_after(seconds):
            await event.wait()
        result = book.results.pop(cid, None)
        if result is None:
            if cid in book.unacked:
                return {"group": name, "id": cid, "tag": tag, "acked": False, "kind": kind}
            raise TimedOut("group %s: checkpoint not cut within %g s (a splitter is not "
                           "connected or the link is down)" % (name, seconds))
        if result != "ok":
            raise Conflict("group %s: no crash-consistent checkpoint: %s" % (name, result))
        return {"group": name, "id": cid, "tag": tag, "acked": True, "kind": kind,
                "wall_ns": req.checkpoint.wall_ns, "cut": [list(c) for c in req.checkpoint.cut]}

    def set_paused(self, name: str, paused: bool) -> Dict[str, Any]:
        """Pause or resume shipping a group; kept across an agent restart."""
        row = self.store.group(name)
        shipper = self.shippers.get(name)
        if row is None or shipper is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        self.store.set_settings(name, dict(row.settings, paused=paused))
        if paused and not shipper.paused:
            shipper.pause()
            log.info("group %s: paused", name)
        elif not paused and shipper.paused:
            shipper.resume()
            log.info("group %s: resumed", name)
        return {"group": name, "paused": paused}

    def set_replica_format(self, name: str, fmt: str) -> Dict[str, Any]:
        """Site B keeps the group's replicas in ``fmt`` too: sent with the next OPEN, which
        opens now (the session ends and reconnects at once; nothing is resent)."""
        row = self.store.group(name)
        shipper = self.shippers.get(name)
        if row is None or shipper is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        if dict(DEFAULT_SETTINGS, **row.settings)["replica_format"] != fmt:
            self.store.set_settings(name, dict(row.settings, replica_format=fmt))
            shipper.row = self.store.group(name) or row
            shipper.reopen()
            log.info("group %s: replicas kept as %s on site B", name, fmt)
        return {"group": name, "replica_format": fmt}

    def set_domains(self, name: str, domains: List[Dict[str, Any]]) -> None:
        """Keep the definitions of the group's libvirt domains (``agent/domains/``) with its
        settings: every OPEN carries them to site B, beginning with the one opened now."""
        row = self.store.group(name)
        shipper = self.shippers.get(name)
        if row is None or shipper is None:
            raise NotFound("no group %s on this site" % name)
        self.store.set_settings(name, dict(row.settings, domains=list(domains)))
        shipper.row = self.store.group(name) or row
        shipper.reopen()

    def set_bandwidth(self, name: str, bytes_per_second: int) -> Dict[str, Any]:
        """Change a group's bandwidth limit now, and for the agent's next start."""
        row = self.store.group(name)
        shipper = self.shippers.get(name)
        if row is None or shipper is None or name in self._busy:
            raise NotFound("no group %s on this site" % name)
        if bytes_per_second < 0:
            raise Invalid("a bandwidth limit cannot be negative")
        settings = dict(row.settings, bandwidth=int(bytes_per_second))
        self.store.set_settings(name, settings)
        shipper.settings["bandwidth"] = int(bytes_per_second)
        shipper.bucket.set_rate(bytes_per_second)
        log.info("group %s: bandwidth limit %s", name,
                 "%d bytes/s" % bytes_per_second if bytes_per_second else "off")
        return {"group": name, "bandwidth": int(bytes_per_second)}

    def checkpoints(self, name: str) -> List[Dict[str, Any]]:
        shipper = self.shippers.get(name)
        if shipper is None:
            raise NotFound("no group %s on this site" % name)
        return list(shipper.book.made)

    def status(self) -> Dict[str, Any]:
        return status.site_status(self.store.groups(), self.shippers, self.links, self.fleet,
                                  time.time())

