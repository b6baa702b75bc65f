"""The group's VMs on site B: a failover defines and starts them, its end removes them.

Theory of operation
-------------------
Site A sends the domains' definitions with the group (``travel.py``); site B keeps them in
the group's directory. ``around`` wraps a failover request (``agent/api/replicas.py``):

- ``test`` and ``live``: once the disks are served (the test view, or the live exports),
  each domain is defined on this site's libvirt (``ferry agent --libvirt-uri``) from its
  definition, its protected disks on the exports' sockets (``xml.recovered``), and started,
  in the boot order with the delay asked for. A test's domains are named ``NAME-test`` (a
  test runs beside production, possibly on the same hosts) and their unmapped interfaces are
  unplugged, on an isolated network Ferry makes here (``networks.py``; removed with the last
  test VM); a live failover keeps the names (``vm_suffix`` changes either) and networks: one
  that does not exist here, mapped or not, refuses the failover before anything serves. A domain of
  that name that runs here already is never replaced. Which domains were defined is written to
  ``<group>/vms.json`` before each is started, so a later stop finds them.
- ``stop-test`` and ``rollback``: the domains ``vms.json`` names are destroyed and undefined
  first (qemu must let go of the exports), then the request goes on.

If a test's domain cannot be defined or started, the ones already started are removed, the
test failover is stopped, and the error names the domain. A live failover that cannot
start a domain stays failed over (the disks are live): the answer says which domain did
not start and why (``vms.error``). A group without definitions (protected by disk, or
plain qemu) starts nothing, as before.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.parse
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional

import trio

from formats.durable import write_atomic

from ..errors import Conflict, FerryError, Invalid, NotFound, StorageError, Unavailable
from ..source.splitters import SplitterError, share_socket
from . import networks, travel, xml
from .hypervisor import Domain, _libvirt, _msg, connection

if TYPE_CHECKING:
    from ..api.app import Api

log = logging.getLogger("ferry.domains")

Work = Callable[[], Awaitable[Any]]
STARTED = "vms.json"
MAX_DELAY = 600.0


def around(api: Api, group: str, body: Dict[str, Any], work: Work) -> Work:
    """``work`` (a failover step), with the group's VMs started after or stopped before."""
    mode = body.get("mode")
    options = _options(body) if mode in ("test", "live") else {}

    async def run() -> Any:
        if mode in ("stop-test", "rollback"):
            await _stop(api, group)
            return await work()
        order = None
        if mode in ("test", "live") and options["start"]:  # checked before the disks serve
            directory = api.target.group(group).directory
            domains = await trio.to_thread.run_sync(travel.load, directory)
            order = _ordered(domains, options["boot_order"]) if domains else None
            if order:  # a network the VMs would lack here: refused before anything serves
                await trio.to_thread.run_sync(networks.check, _domains(api).uri, order,
                                              options["network_map"], mode == "test")
        result = await work()
        if order:
            await _start(api, group, str(mode), result, order, options)
        return result
    return run


def _options(body: Dict[str, Any]) -> Dict[str, Any]:
    start = body.get("vms", True)
    nmap = body.get("network_map") or {}
    order = body.get("boot_order") or []
    delay = body.get("boot_delay", 0)
    suffix = body.get("vm_suffix", "-test" if body.get("mode") == "test" else "")
    if not isinstance(suffix, str) or len(suffix) > 32 or not all(
            c.isalnum() or c in "-_." for c in suffix):
        raise Invalid("vm_suffix is at most 32 letters, digits, '-', '_' or '.'")
    if not isinstance(start, bool):
        raise Invalid("vms is true or false")
    if not isinstance(nmap, dict) or len(nmap) > 64 or not all(
            isinstance(k, str) and isinstance(v, str) and k and v and len(k + v) < 512
            for k, v in nmap.items()):
        raise Invalid("network_map maps network names of site A to names of site B")
    if not isinstance(order, list) or len(order) > 64 or not all(
            isinstance(n, str) and n for n in order):
        raise Invalid("boot_order is a list of domain names")
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) \
            or not 0 <= delay <= MAX_DELAY:
        raise Invalid("boot_delay is 0 to %g seconds" % MAX_DELAY)
    return {"start": start, "network_map": nmap, "boot_order": order,
            "boot_delay": float(delay), "suffix": suffix}


def _domains(api: Api) -> Any:
    from .service import Domains
    if api.domains is None:
        api.domains = Domains(api.source)
    return api.domains


async def _start(api: Api, group: str, mode: str, result: Dict[str, Any],
                 order: List[Dict[str, Any]], options: Dict[str, Any]) -> None:
    directory = api.target.group(group).directory
    sockets = {disk: _socket(uri) for disk, uri in result["disks"].items()}
    test = mode == "test"
    vms = _domains(api)
    started: List[str] = []
    try:
        for i, d in enumerate(order):
            if i and options["boot_delay"]:
                await trio.sleep(options["boot_delay"])
            name = d["name"] + options["suffix"]
            definition = xml.recovered(d["xml"], name, {
                dev: sockets[disk] for dev, disk in d["disks"].items()}, test,
                options["network_map"])
            await trio.to_thread.run_sync(_share, [sockets[x] for x in d["disks"].values()],
                                          vms.source.fleet.socket_group)
            started.append(name)
            await trio.to_thread.run_sync(_save, directory, mode, started)
            if xml.ISOLATED in xml.networks(definition):
                await trio.to_thread.run_sync(networks.ensure_isolated, vms.uri)
            await trio.to_thread.run_sync(_define_and_start, vms.uri, name, definition)
            log.info("group %s: %s failover: domain %s started", group, mode, name)
    except FerryError as e:
        if not test:
            result["vms"] = {"started": started[:-1], "error": str(e)}
            log.error("group %s failed over, but %s", group, e)
            return
        with trio.CancelScope(shield=True):
            await _stop(api, group)
            await api.target.stop_test(group)
        raise
    result["vms"] = {"started": started}


def _ordered(domains: List[Dict[str, Any]], order: List[str]) -> List[Dict[str, Any]]:
    names = [d["name"] for d in domains]
    unknown = [n for n in order if n not in names]
    if unknown:
        raise Invalid("boot order: the group has no domain %s (it has %s)"
                      % (unknown[0], ", ".join(names)))
    rank = {n: i for i, n in enumerate(order)}
    return sorted(domains, key=lambda d: rank.get(d["name"], len(order)))


def _socket(uri: str) -> str:
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(uri).query)
    return query["socket"][0]


def _share(sockets: List[str], group: Optional[str]) -> None:
    if group is None:
        return
    for sock in sockets:
        try:
            share_socket(sock, group)
        except (SplitterError, OSError) as e:
            raise Unavailable("cannot let group %s reach export %s: %s" % (group, sock, e)
                             ) from None


def _define_and_start(uri: str, name: str, definition: str) -> None:
    lv = _libvirt()
    with connection(uri) as conn:
        try:
            if Domain(conn, name).running():
                raise Conflict("domain %s already runs here: not replaced (a failover "
                               "names its domains NAME-test, or NAME with --vm-suffix)"
                               % name)
        except NotFound:
            pass
        try:
            dom = conn.defineXML(definition)
        except lv.libvirtError as e:
            raise Unavailable("domain %s: libvirt refused its definition here: %s"
                             % (name, _msg(e))) from None
        try:
            dom.create()
        except lv.libvirtError as e:
            raise Unavailable("domain %s: cannot start: %s" % (name, _msg(e))) from None


async def _stop(api: Api, group: str) -> List[str]:
    try:
        directory = api.target.group(group).directory
    except NotFound:
        return []
    names = await trio.to_thread.run_sync(_load, directory)
    if not names:
        return []
    await trio.to_thread.run_sync(_remove, _domains(api).uri, group, names)
    await trio.to_thread.run_sync(_save, directory, None, [])
    await trio.to_thread.run_sync(networks.drop_isolated, _domains(api).uri)
    return names


def _remove(uri: str, group: str, names: List[str]) -> None:
    lv = _libvirt()
    with connection(uri) as conn:
        for name in reversed(names):
            try:
                dom = Domain(conn, name)
            except NotFound:
                continue  # removed by hand meanwhile
            try:
                if dom.running():
                    dom.dom.destroy()
                dom.dom.undefine()
            except lv.libvirtError as e:
                raise Unavailable("group %s: domain %s cannot be removed: %s"
                                 % (group, name, _msg(e))) from None
            log.info("group %s: domain %s stopped and undefined", group, name)


def _save(directory: str, mode: Optional[str], names: List[str]) -> None:
    path = os.path.join(directory, STARTED)
    if not names:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        return
    write_atomic(path, json.dumps({"mode": mode, "domains": names}).encode())


def _load(directory: str) -> List[str]:
    try:
        with open(os.path.join(directory, STARTED), "rb") as f:
            return list(json.loads(f.read())["domains"])
    except FileNotFoundError:
        return []
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StorageError("%s/%s cannot be read: %s" % (directory, STARTED, e)) from None
