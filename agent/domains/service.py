"""Protecting libvirt domains as a group: ``Domains`` on the source site.

Protect (offline): each named domain must be shut off; its writable disks become the
group's disks (named by target dev, ``vda``; ``DOMAIN.vda`` when the group has several
domains), the group is protected as any group is (``protect_disks``, the ordinary path,
which starts the splitters), the domains' definitions are recorded with the group
(``record.py``), and then each domain is redefined with its disks on the splitters' NBD
sockets. If a redefinition fails, the domains already redefined are put back and the group
is unprotected: a domain is attached whole or not at all.

Unprotect: each domain must be shut off; its disks are put back as they were (``detach``),
then the group is unprotected the ordinary way and its record removed.
"""

from __future__ import annotations

import logging
from typing import Any, Awaitable, Callable, Dict, List, Optional, Tuple

import trio

from ..errors import Invalid
from ..source import NAME_RE, SourceSite
from . import record, xml
from .hypervisor import DEFAULT_URI, Domain, connection

log = logging.getLogger("ferry.domains")

MAX_DOMAINS = 32

ProtectDisks = Callable[[List[Tuple[str, str]]], Awaitable[Dict[str, Any]]]


class Domains:
    def __init__(self, source: SourceSite, uri: str = DEFAULT_URI) -> None:
        self.source = source
        self.uri = uri

    def protected_by_domain(self, group: str) -> bool:
        return record.load(self.source.data_dir, group) is not None

    async def protect(self, group: str, names: List[str], protect_disks: ProtectDisks
                      ) -> Dict[str, Any]:
        if not names or len(names) > MAX_DOMAINS:
            raise Invalid("give 1 to %d domains" % MAX_DOMAINS)
        if len(set(names)) != len(names):
            raise Invalid("a domain is named twice")
        found = await trio.to_thread.run_sync(self._read, names)
        disks: List[Tuple[str, str]] = []
        for name, (_xml, dds) in found.items():
            if not dds:
                raise Invalid("domain %s has no writable disk to protect" % name)
            for d in dds:
                disks.append((_disk_name(name, d.dev, len(names)), d.path))
        result = await protect_disks(disks)
        try:
            rec = await trio.to_thread.run_sync(self._attach, group, found, len(names))
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.source.unprotect(group)
            raise
        result["domains"] = {d["name"]: {"disks": {x["dev"]: x["disk"] for x in d["disks"]},
                                         "attached": "offline"} for d in rec["domains"]}
        log.info("group %s: domain(s) %s attached to their splitters (offline)", group,
                 ", ".join(names))
        return result

    def _read(self, names: List[str]) -> Dict[str, Tuple[str, List[xml.DomainDisk]]]:
        out = {}
        with connection(self.uri) as conn:
            for name in names:
                dom = Domain(conn, name)
                dom.require_shut_off("protect it")
                text = dom.inactive_xml()
                out[name] = (text, xml.writable_disks(text))
        return out

    def _attach(self, group: str, found: Dict[str, Tuple[str, List[xml.DomainDisk]]],
                count: int) -> Dict[str, Any]:
        row = self.source.store.group(group)
        assert row is not None
        sockets = {d.name: self.source.fleet.paths(d).socket for d in row.disks}
        rec: Dict[str, Any] = {"group": group, "uri": self.uri, "domains": []}
        for name, (text, dds) in found.items():
            rec["domains"].append({"name": name, "xml": text, "disks": [
                {"dev": d.dev, "disk": _disk_name(name, d.dev, count), "path": d.path,
                 "socket": sockets[_disk_name(name, d.dev, count)], "element": d.element}
                for d in dds]})
        record.save(self.source.data_dir, group, rec)
        done: List[Tuple[Domain, str]] = []
        with connection(self.uri) as conn:
            try:
                for entry in rec["domains"]:
                    dom = Domain(conn, entry["name"])
                    dom.require_shut_off("protect it")
                    dom.define(xml.attach(dom.inactive_xml(), _sockets(entry)))
                    done.append((dom, entry["xml"]))
            except BaseException:
                for dom, original in reversed(done):
                    dom.define(original)
                record.remove(self.source.data_dir, group)
                raise
        return rec

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
            doms = [(Domain(conn, e["name"]), e) for e in rec["domains"]]
            for dom, _e in doms:
                dom.require_shut_off("unprotect it")
            for dom, entry in doms:
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
