"""Protecting libvirt domains as a group: ``Domains`` on the source site.

Protect: each named domain's writable disks become the group's disks (named by target
dev, ``vda``; ``DOMAIN.vda`` when the group has several domains), the group is protected
as any group is (``protect_disks``, the ordinary path, which starts the splitters), the
domains' definitions are recorded with the group (``record.py``), and then each domain is
redefined with its disks on the splitters' NBD sockets. A running domain is attached live
first (``live.py``: mirror onto the splitter, pivot); the in-use check lets its own qemu
through meanwhile, and nothing else. If attaching fails before any disk pivoted, the
domains already redefined are put back and the group is unprotected; after a pivot the
group stays (its guest reads the splitter now) and the error says so.

Unprotect: each running domain is first copied back onto its own disks live (the same
mirror and pivot, the other way); then each definition gets its disks back as they were
(``detach``), the group is unprotected the ordinary way and its record removed. If a
disk cannot be moved back, the group stays protected (its splitters keep serving).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple

import trio

from .. import inuse
from ..errors import Conflict, FerryError, Invalid, NotFound, Unavailable
from ..source.settings import NAME_RE
from . import live, quiesce, record, travel, xml
from .hooks import DEFAULT_DIR, Hooks

if TYPE_CHECKING:  # agent.source imports the target role, whose server imports us
    from ..source import SourceSite
from .hypervisor import (
    DEFAULT_URI,
    Domain,
    GuestAgent,
    _libvirt,
    close_connection,
    connection,
    open_connection,
)

log = logging.getLogger("ferry.domains")

MAX_DOMAINS = 32
REFRESH_EVERY = 600.0  # seconds between two looks at the definitions of protected domains

ProtectDisks = Callable[[List[Tuple[str, str]]], Awaitable[Dict[str, Any]]]


@dataclass
class Found:
    """A domain as protect found it."""

    definition: str             # its persistent definition
    disks: List[xml.DomainDisk]  # the disks it writes (now, if it runs)
    running: bool
    uuid: str


class Domains:
    def __init__(self, source: SourceSite, uri: str = DEFAULT_URI,
                 hooks_dir: Optional[str] = DEFAULT_DIR) -> None:
        self.source = source
        self.uri = uri
        self.hooks = Hooks(hooks_dir)
        self._last_app: Dict[str, float] = {}  # group: when its last scheduled one started
        self._freezing: Dict[str, trio.Lock] = {}  # one freeze of a group's guests at a time

    def protected_by_domain(self, group: str) -> bool:
        return record.load(self.source.data_dir, group) is not None

    async def protect(self, group: str, names: List[str], protect_disks: ProtectDisks,
                      app_every: float = 0) -> Dict[str, Any]:
        if app_every < 0 or app_every > 30 * 86400:
            raise Invalid("app_consistent_every is 0 (none) to 30 days in seconds")
        if not names or len(names) > MAX_DOMAINS:
            raise Invalid("give 1 to %d domains" % MAX_DOMAINS)
        if len(set(names)) != len(names):
            raise Invalid("a domain is named twice")
        found = await trio.to_thread.run_sync(self._read, names)
        disks: List[Tuple[str, str]] = []
        for name, f in found.items():
            if not f.disks:
                raise Invalid("domain %s has no writable disk to protect" % name)
            for d in f.disks:
                disks.append((_disk_name(name, d.dev, len(names)), d.path))
        paths = [d.path for f in found.values() if f.running for d in f.disks]
        pids = [p for f in found.values() if f.running for p in await trio.to_thread.run_sync(
            live.qemu_pids, [d.path for d in f.disks], f.uuid)]
        with inuse.expecting(paths, pids):
            result = await protect_disks(disks)
        pivoted: List[str] = []
        try:
            rec = await trio.to_thread.run_sync(self._attach, group, found, len(names),
                                                pivoted, app_every)
        except BaseException:
            if not pivoted:
                with trio.CancelScope(shield=True):
                    await self.source.unprotect(group)
            raise
        self.source.set_domains(group, travel.payload(rec))  # to site B with the group
        result["app_consistent_every"] = app_every
        result["domains"] = {d["name"]: {"disks": {x["dev"]: x["disk"] for x in d["disks"]},
                                         "attached": d["attached"],
                                         "pivot_seconds": d.get("pivot_seconds")}
                             for d in rec["domains"]}
        log.info("group %s: domain(s) %s attached to their splitters", group, ", ".join(
            "%s (%s)" % (d["name"], d["attached"]) for d in rec["domains"]))
        return result

    def _read(self, names: List[str]) -> Dict[str, Found]:
        out = {}
        with connection(self.uri) as conn:
            for name in names:
                dom = Domain(conn, name)
                text = dom.inactive_xml()
                running = dom.running()
                disks = xml.writable_disks(text)
                if running:  # the disks it has now; each put back as its definition has it
                    defined = {d.dev: d.element for d in disks}
                    disks = [xml.DomainDisk(d.dev, d.kind, d.path, defined.get(d.dev, d.element))
                             for d in xml.writable_disks(dom.live_xml())]
                out[name] = Found(text, disks, running, dom.uuid())
        return out

    def _attach(self, group: str, found: Dict[str, Found], count: int,
                pivoted: List[str], app_every: float = 0) -> Dict[str, Any]:
        row = self.source.store.group(group)
        assert row is not None
        sockets = {d.name: self.source.fleet.paths(d).socket for d in row.disks}
        rec: Dict[str, Any] = {"group": group, "uri": self.uri, "domains": [],
                               "app_consistent_every": app_every}
        for name, f in found.items():
            rec["domains"].append({"name": name, "xml": f.definition, "running": f.running,
                                   "attached": "live" if f.running else "offline",
                                   "disks": [
                {"dev": d.dev, "kind": d.kind, "disk": _disk_name(name, d.dev, count),
                 "path": d.path,
                 "socket": sockets[_disk_name(name, d.dev, count)], "element": d.element}
                for d in f.disks]})
        record.save(self.source.data_dir, group, rec)
        done: List[Tuple[Domain, str]] = []
        with connection(self.uri) as conn:
            try:
                for entry in rec["domains"]:
                    dom = Domain(conn, entry["name"])
                    if entry["running"] or dom.running():  # (or started meanwhile)
                        entry["attached"] = "live"
                        entry["pivot_seconds"] = self._attach_live(dom, entry, pivoted)
                    persistent = dom.inactive_xml()
                    devs = set(xml.disk_devs(persistent))  # a pivot may have changed it
                    dom.define(xml.attach(persistent, {dev: s for dev, s in _sockets(entry).items()
                                                       if dev in devs}))
                    done.append((dom, entry["xml"]))
            except FerryError as e:
                if pivoted:
                    raise Unavailable("%s; disk(s) %s already read their splitters: group %s "
                                      "stays protected" % (e, ", ".join(pivoted), group)
                                      ) from None
                for dom, original in reversed(done):
                    dom.define(original)
                record.remove(self.source.data_dir, group)
                raise
        record.save(self.source.data_dir, group, rec)
        return rec

    def _attach_live(self, dom: Domain, entry: Dict[str, Any], pivoted: List[str]
                     ) -> float:
        """Mirror and pivot each disk of a running domain; the longest pivot's seconds."""
        longest = 0.0
        for d in entry["disks"]:
            seconds = live.copy_and_pivot(_libvirt(), dom.dom, entry["name"], d["dev"],
                                          live.nbd_disk_xml(d["socket"]))
            pivoted.append("%s/%s" % (entry["name"], d["dev"]))
            longest = max(longest, seconds)
        return round(longest, 4)

    async def app_checkpoint(self, group: str, tag: Optional[str], seconds: float,
                             limit: float = quiesce.DEFAULT_LIMIT) -> Dict[str, Any]:
        """Freeze the group's guests, cut an ``app`` checkpoint, thaw (``quiesce.py``)."""
        rec = await trio.to_thread.run_sync(record.load, self.source.data_dir, group)
        if rec is None:
            if self.source.store.group(group) is None:
                raise NotFound("no group %s on this site" % group)
            raise Invalid("group %s was protected by disk, not by domain (--domain): it has "
                          "no guest agent to freeze its file systems" % group)
        if not 0 < limit <= 600:
            raise Invalid("the freeze limit is more than 0 and at most 600 seconds")
        async with self._freezing.setdefault(group, trio.Lock()):
            return await self._app_checkpoint(group, rec, tag, seconds, limit)

    async def _app_checkpoint(self, group: str, rec: Dict[str, Any], tag: Optional[str],
                              seconds: float, limit: float) -> Dict[str, Any]:
        conn = await trio.to_thread.run_sync(open_connection, rec.get("uri") or self.uri)
        try:
            guests = []
            for entry in rec["domains"]:
                dom = await trio.to_thread.run_sync(Domain, conn, entry["name"])
                if not await trio.to_thread.run_sync(dom.running):
                    raise Conflict("domain %s is not running: no file system to freeze "
                                   "(a crash-consistent checkpoint is as good)" % dom.name)
                guests.append(GuestAgent(dom))

            async def cut(event: trio.Event) -> Dict[str, Any]:
                return await self.source.checkpoint(group, tag, seconds, kind="app", cut=event)

            result = await quiesce.app_checkpoint(group, list(guests), self.hooks, cut, limit)
            await self._refresh(conn, group, rec)
            return result
        finally:
            await trio.to_thread.run_sync(close_connection, conn)

    async def _refresh(self, conn: Any, group: str, rec: Dict[str, Any]) -> None:
        """Send site B the domains' definitions again if they changed since they were
        recorded (after each application-consistent checkpoint, and every
        ``REFRESH_EVERY`` seconds)."""
        try:
            changed = await trio.to_thread.run_sync(self._reread, conn, rec)
        except FerryError as e:
            log.warning("group %s: the domains' definitions cannot be read again: %s",
                        group, e)
            return
        if changed:
            await trio.to_thread.run_sync(record.save, self.source.data_dir, group, rec)
            self.source.set_domains(group, travel.payload(rec))
            log.info("group %s: domain definition(s) of %s changed: sent to site B again",
                     group, ", ".join(changed))

    def _reread(self, conn: Any, rec: Dict[str, Any]) -> List[str]:
        """Update ``rec`` with each domain's definition as it is now (its protected disks as
        they were before Ferry); the names of those that changed."""
        changed = []
        for entry in rec["domains"]:
            try:
                dom = Domain(conn, entry["name"])
            except NotFound:
                continue
            originals = {d["dev"]: d["element"] for d in entry["disks"]}
            now = xml.detach(dom.inactive_xml(), originals, _sockets(entry))
            if not xml.same(now, entry["xml"]):
                entry["xml"] = now
                changed.append(entry["name"])
        return changed

    async def run(self, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                  ) -> None:
        """Cut each group's scheduled application-consistent checkpoints
        (``protect --app-consistent-every``); a failed one is logged, the next one tried."""
        task_status.started()
        last_refresh = trio.current_time()
        while True:
            await trio.sleep(1)
            if trio.current_time() - last_refresh >= REFRESH_EVERY:
                last_refresh = trio.current_time()
                await self._refresh_all()
            for group, every in (await trio.to_thread.run_sync(self._schedules)).items():
                now = trio.current_time()
                if now - self._last_app.setdefault(group, now) < every:
                    continue
                self._last_app[group] = now
                try:
                    await self.app_checkpoint(group, None, 30.0)
                except FerryError as e:
                    log.warning("group %s: scheduled application-consistent checkpoint "
                                "failed: %s", group, e)
                except Exception:  # a bug here must not stop the agent: say so, go on
                    log.exception("group %s: scheduled application-consistent checkpoint "
                                  "failed", group)

    async def _refresh_all(self) -> None:
        for group in list(self.source.shippers):
            try:
                rec = await trio.to_thread.run_sync(record.load, self.source.data_dir, group)
                if rec is None:
                    continue
                conn = await trio.to_thread.run_sync(open_connection,
                                                     rec.get("uri") or self.uri)
            except FerryError as e:
                log.warning("group %s: the domains' definitions cannot be read again: %s",
                            group, e)
                continue
            try:
                async with self._freezing.setdefault(group, trio.Lock()):
                    await self._refresh(conn, group, rec)
            finally:
                await trio.to_thread.run_sync(close_connection, conn)

    def _schedules(self) -> Dict[str, float]:
        out = {}
        for group in self.source.shippers:
            try:
                rec = record.load(self.source.data_dir, group)
            except FerryError:
                continue
            if rec and rec.get("app_consistent_every"):
                out[group] = float(rec["app_consistent_every"])
        return out

    async def unprotect(self, group: str) -> Optional[Dict[str, Any]]:
        """Detach the group's domains and unprotect it; None if it has no domains."""
        rec = await trio.to_thread.run_sync(record.load, self.source.data_dir, group)
        if rec is None:
            return None
        await trio.to_thread.run_sync(self._detach, rec)
        result = await self.source.unprotect(group)
        await trio.to_thread.run_sync(record.remove, self.source.data_dir, group)
        result["domains"] = [d["name"] for d in rec["domains"]]
        log.info("group %s: domain(s) %s back on their own disks", group,
                 ", ".join(result["domains"]))
        return result

    def _detach(self, rec: Dict[str, Any]) -> None:
        with connection(rec.get("uri") or self.uri) as conn:
            doms = []
            for e in rec["domains"]:
                try:
                    doms.append((Domain(conn, e["name"]), e))
                except NotFound:  # undefined meanwhile: nothing of it to put back
                    log.warning("group %s: domain %s is gone; unprotecting without it",
                                rec["group"], e["name"])
            for dom, entry in doms:
                if dom.running():  # back onto its own disks first, live
                    for d in entry["disks"]:
                        live.copy_and_pivot(_libvirt(), dom.dom, entry["name"], d["dev"],
                                            live.plain_disk_xml(d["kind"], d["path"]))
                originals = {d["dev"]: d["element"] for d in entry["disks"]}
                dom.define(xml.detach(dom.inactive_xml(), originals, _sockets(entry)))


def _sockets(entry: Dict[str, Any]) -> Dict[str, str]:
    return {d["dev"]: d["socket"] for d in entry["disks"]}


def _disk_name(domain: str, dev: str, count: int) -> str:
    name = dev if count == 1 else "%s.%s" % (domain, dev)
    if not NAME_RE.match(name):
        raise Invalid("domain %s disk %s: %r is not a usable disk name (letters, digits, "
                      "'_', '.', '-')" % (domain, dev, name))
    return name
