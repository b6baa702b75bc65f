"""The agent's HTTP API (JSON), served by hypercorn on trio.

    GET    /v1/status[?group=NAME]          this site's groups (source) and replicas (target)
    POST   /v1/groups                       protect: {name, target, disks: [{name, path}],
                                            allow_unreachable?, queue_bytes?,
                                            seeds?: {disk: path on site B}}
    DELETE /v1/groups/NAME                  unprotect
    POST   /v1/groups/NAME/wait             {timeout}: return once synced (504 if not)
    POST   /v1/groups/NAME/settings         {bandwidth}: change the link's limit now
    POST   /v1/groups/NAME/pause, .../resume  stop / restart shipping (kept across restarts)
    POST   /v1/groups/NAME/checkpoints      {tag?, timeout?}: cut a user checkpoint (source)
    GET    /v1/checkpoints/NAME             {"source": [...] | null, "target": [...] | null}
    POST   /v1/replicas/NAME/views          {checkpoint?, at_ns?, test?}: serve a point (target)
    DELETE /v1/views/ID                     close a view
    POST   /v1/replicas/NAME/failover       {mode: test|stop-test|live, checkpoint?, at_ns?}
    POST   /v1/replicas/NAME/restore        {disk, to, checkpoint?, at_ns?}: a disk to a file
                                            (default: its newest consistent state)
    POST   /v1/pair-token                   {ttl?}: a one-time pairing token (this site)
    POST   /v1/pairs                        {address, token}: pair with the site there
    GET    /v1/pairs                        this site's fingerprint and paired sites
    DELETE /v1/pairs/SITE                   forget a paired site (by name or fingerprint)
    GET    /v1/events?after=ID&wait=S&limit=N  events after ID, waiting up to S s (long poll)
    GET    /v1/alerts                       alerts raised now, and the alert settings
    POST   /v1/groups/NAME/alerts           {rpo_alert: seconds | null}
    GET    /v1/overview                     what the dashboard draws
    POST   /v1/jobs                         {kind: restore|wait|failover, group, ...the
                                            synchronous endpoint's body}: 202, the job
    GET    /v1/jobs, /v1/jobs/ID[?wait=S]   jobs; one job, waiting up to S s for its end
    GET    /metrics                         Prometheus text format (agent/metrics.py)
    GET    /healthz                         {ok, site}
    GET    /v1/dashboard-url                the dashboard's login addresses (local socket only)
    GET    /, /ui/FILE                      the dashboard (agent/web/)

Errors are ``{"error": "one line for the user"}`` with a 4xx or 5xx status.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote

import trio

from . import metrics, tls
from .dashboard import Files
from .errors import (
    FerryError,
    Forbidden,
    Invalid,
    NotFound,
    TooLarge,
    Unavailable,
    http_status,
    kind_of,
)
from .pairing import Trust
from .source import SourceSite, parse_target
from .target import TargetSite

if TYPE_CHECKING:
    from .jobs import Jobs
    from .watch import Watcher


def version() -> str:
    try:
        from importlib.metadata import version as dist_version
        return dist_version("ferry")
    except Exception:  # a source tree, not installed
        return "0.1.0"

log = logging.getLogger("ferry.api")

MAX_REQUEST = 1024 * 1024

Handler = Callable[..., Awaitable[Tuple[int, Any]]]


class Api:
    def __init__(self, source: SourceSite, target: TargetSite, site: str, trust: Trust
                 ) -> None:
        self.source = source
        self.target = target
        self.site = site
        self.trust = trust
        self.started = time.time()
        self.watcher: Optional[Watcher] = None
        self.jobs: Optional[Jobs] = None
        self.files = Files()
        self.dashboard_urls: List[str] = []  # login addresses, told to local users only
        self._policy = "local"

    async def __call__(self, scope: Dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        page = self.files.page(scope["path"]) if scope["method"] == "GET" else None
        if page is not None:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"content-type", page.ctype.encode()),
                (b"content-length", str(len(page.body)).encode()), *page.headers]})
            await send({"type": "http.response.body", "body": page.body})
            return
        self._policy = scope.get("ferry_policy", "local")
        try:
            body = await _read_body(receive)
            status, payload = await self._route(scope["method"], scope["path"],
                                                parse_qs(scope.get("query_string", b"").decode()),
                                                body)
        except FerryError as e:
            status, payload = http_status(e), {"error": str(e), "kind": kind_of(e)}
        except OSError as e:
            log.exception("request failed")
            status, payload = 500, {"error": "%s: %s" % (type(e).__name__, e)}
        except Exception as e:  # a bug: say so in one line, keep the agent serving
            log.exception("request failed")
            status, payload = 500, {"error": "internal error (%s); see the agent's log"
                                    % type(e).__name__}
        if isinstance(payload, bytes):
            data = payload
            ctype = metrics.CONTENT_TYPE.encode()
        else:
            data = (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()
            ctype = b"application/json"
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _route(self, method: str, path: str, query: Dict[str, list],
                     body: Dict[str, Any]) -> Tuple[int, Any]:
        parts = [unquote(p) for p in path.strip("/").split("/")]
        if parts == ["v1", "status"] and method == "GET":
            return 200, self.status((query.get("group") or [None])[0],
                                    await trio.to_thread.run_sync(self.target.status))
        if parts == ["metrics"] and method == "GET":
            return 200, self.metrics(await self.status_async())
        if parts == ["healthz"] and method == "GET":
            return 200, {"ok": True, "site": self.site}
        if parts == ["v1", "events"] and method == "GET":
            return 200, await self._events(query)
        if parts == ["v1", "alerts"] and method == "GET":
            return 200, self._watcher().alerts_document()
        if parts == ["v1", "overview"] and method == "GET":
            self._watcher()  # 503 before any work when it is not running
            return 200, self.overview(await self.status_async())
        if parts == ["v1", "dashboard-url"] and method == "GET":
            if self._policy != "local":
                raise Forbidden("the dashboard's login address is told on the local socket "
                                "only")
            if not self.dashboard_urls:
                raise NotFound("no TCP listener: start the agent with --api 127.0.0.1:PORT "
                               "(or https://HOST:PORT) to serve the dashboard")
            return 200, {"urls": self.dashboard_urls}
        if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "alerts" \
                and method == "POST":
            if set(body) != {"rpo_alert"}:
                raise Invalid("alert settings: rpo_alert (seconds, or null for none)")
            value = body["rpo_alert"]
            if value is not None and (not isinstance(value, (int, float))
                                      or isinstance(value, bool) or value <= 0):
                raise Invalid("rpo_alert must be a positive number of seconds or null")
            if parts[2] not in self.source.status():
                raise NotFound("no group %s on this site" % parts[2])
            return 200, self._watcher().set_rpo_alert(parts[2], value)
        if parts[:2] in (["v1", "pair-token"], ["v1", "pairs"]):
            return await self._pairing(method, parts, body)
        if parts == ["v1", "groups"] and method == "POST":
            disks = body.get("disks")
            if not isinstance(disks, list) or not all(
                    isinstance(d, dict) and isinstance(d.get("name"), str)
                    and isinstance(d.get("path"), str) for d in disks):
                raise Invalid("disks must be a list of {name, path}")
            kwargs: Dict[str, Any] = {}
            if "queue_bytes" in body:
                kwargs["queue_bytes"] = _positive_int(body, "queue_bytes")
            settings: Dict[str, Any] = {}
            for key in ("history_s", "journal_max"):
                if key in body:
                    settings[key] = _positive_int(body, key)
            if "checkpoint_interval" in body:
                interval = body["checkpoint_interval"]
                if not isinstance(interval, (int, float)) or isinstance(interval, bool) \
                        or interval < 0:
                    raise Invalid("checkpoint_interval must be a number of seconds")
                settings["checkpoint_interval"] = float(interval)
            if "bandwidth" in body:
                settings["bandwidth"] = _bandwidth(body)
            kwargs["settings"] = settings
            seeds = body.get("seeds", {})
            if not isinstance(seeds, dict) or not all(
                    isinstance(p, str) and p for p in seeds.values()):
                raise Invalid("seeds must be an object {disk: path on the target site}")
            kwargs["seeds"] = seeds
            return 201, await self.source.protect(
                _str(body, "name"), [(d["name"], d["path"]) for d in disks],
                _str(body, "target"), allow_unreachable=bool(body.get("allow_unreachable")),
                **kwargs)
        if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "settings" \
                and method == "POST":
            if set(body) != {"bandwidth"}:
                raise Invalid("settings that change at run time: bandwidth")
            return 200, self.source.set_bandwidth(parts[2], _bandwidth(body))
        if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] in ("pause", "resume") \
                and method == "POST":
            return 200, self.source.set_paused(parts[2], parts[3] == "pause")
        if len(parts) == 3 and parts[:2] == ["v1", "groups"] and method == "DELETE":
            return 200, await self.source.unprotect(parts[2])
        if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "wait" \
                and method == "POST":
            timeout = body.get("timeout", 600)
            if not isinstance(timeout, (int, float)) or timeout < 0:
                raise Invalid("timeout must be a number of seconds")
            return 200, await self.source.wait_synced(parts[2], float(timeout))
        if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "checkpoints" \
                and method == "POST":
            tag = body.get("tag")
            if tag is not None and not isinstance(tag, str):
                raise Invalid("tag must be a string")
            timeout = body.get("timeout", 30)
            if not isinstance(timeout, (int, float)) or timeout < 0:
                raise Invalid("timeout must be a number of seconds")
            return 200, await self.source.checkpoint(parts[2], tag, float(timeout))
        if len(parts) == 3 and parts[:2] == ["v1", "checkpoints"] and method == "GET":
            name = parts[2]
            src = self.source.checkpoints(name) if name in self.source.shippers else None
            tgt = self.target.checkpoints(name) if name in self.target.groups else None
            if src is None and tgt is None:
                raise NotFound("no group %s on this site" % name)
            return 200, {"group": name, "source": src, "target": tgt}
        if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "views" \
                and method == "POST":
            return 201, await self.target.open_view(parts[2], *_point(body))
        if len(parts) == 3 and parts[:2] == ["v1", "views"] and method == "DELETE":
            return 200, await self.target.close_view(parts[2])
        if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "failover" \
                and method == "POST":
            work = self._failover(parts[2], body)
            return (201 if body.get("mode") == "test" else 200), await work()
        if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "restore" \
                and method == "POST":
            return 200, await self._restore(parts[2], body)()
        if parts[:2] == ["v1", "jobs"]:
            return await self._jobs(method, parts, query, body)
        raise NotFound("no such endpoint: %s %s" % (method, path))

    async def _pairing(self, method: str, parts: List[str], body: Dict[str, Any]
                       ) -> Tuple[int, Any]:
        trust = self.trust
        if parts == ["v1", "pair-token"] and method == "POST":
            ttl = body.get("ttl", tls.TOKEN_TTL)
            if not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= 86400:
                raise Invalid("ttl must be a number of seconds from 1 to 86400")
            return 201, trust.make_token(float(ttl))
        if parts == ["v1", "pairs"] and method == "GET":
            return 200, trust.status()
        if parts == ["v1", "pairs"] and method == "POST":
            address = _str(body, "address")
            host, port = parse_target(address)
            try:
                return 201, await trust.pair(host, port, address, _str(body, "token"))
            except tls.PairingError as e:
                raise Forbidden(str(e)) from None
            except OSError as e:
                raise Unavailable("cannot reach %s: %s" % (address, e.strerror or e)) from None
        if len(parts) == 3 and parts[1] == "pairs" and method == "DELETE":
            if not trust.unpair(parts[2]):
                raise NotFound("no paired site %s" % parts[2])
            return 200, trust.status()
        raise NotFound("no such endpoint: %s /%s" % (method, "/".join(parts)))

    def _failover(self, group: str, body: Dict[str, Any]) -> Callable[[], Awaitable[Any]]:
        mode = body.get("mode")
        point = _point(body)
        if mode == "test":
            return lambda: self.target.open_view(group, *point, test=True)
        if mode == "stop-test":
            return lambda: self.target.stop_test(group)
        if mode == "live":
            return lambda: self.target.failover_live(group, *point)
        raise Invalid("mode must be test, stop-test or live")

    def _restore(self, group: str, body: Dict[str, Any]) -> Callable[[], Awaitable[Any]]:
        disk, to, point = _str(body, "disk"), _str(body, "to"), _point(body)
        return lambda: self.target.restore(group, disk, to, *point)

    def _restore_progress(self, group: str, body: Dict[str, Any]
                          ) -> Callable[[], Optional[Dict[str, Any]]]:
        """A restore's progress: bytes of the replica copied so far (its allocated bytes;
        the journal's overlay written after is not counted)."""
        replica = self.target.status()[group]["disks"][body["disk"]]["replica"]
        partial = os.path.abspath(body["to"]) + ".ferry-partial"

        def progress() -> Optional[Dict[str, Any]]:
            total = os.stat(replica).st_blocks * 512
            try:
                done = os.stat(partial).st_blocks * 512
            except FileNotFoundError:
                done = total if os.path.exists(body["to"]) else 0
            return {"progress": round(min(1.0, done / total), 4) if total else 1.0,
                    "done_bytes": done, "total_bytes": total, "eta_seconds": None}
        return progress

    def _wait_progress(self, group: str) -> Callable[[], Optional[Dict[str, Any]]]:
        def progress() -> Optional[Dict[str, Any]]:
            if self.watcher is None:
                return None
            disks = self.source.status().get(group, {}).get("disks", {})
            ps = [p for p in (self.watcher.progress(group, d) for d in disks) if p]
            if not ps:
                return None
            done = sum(p["delivered_bytes"] for p in ps)
            total = sum(p["total_bytes"] for p in ps)
            etas = [p["eta_seconds"] for p in ps]
            return {"progress": round(done / total, 4) if total else 0.0, "done_bytes": done,
                    "total_bytes": total,
                    "eta_seconds": None if None in etas else max(etas)}
        return progress

    async def _jobs(self, method: str, parts: List[str], query: Dict[str, list],
                    body: Dict[str, Any]) -> Tuple[int, Any]:
        if self.jobs is None:
            raise Unavailable("the agent's job runner is not running")
        if parts == ["v1", "jobs"] and method == "GET":
            return 200, {"jobs": self.jobs.list()}
        if len(parts) == 3 and method == "GET":
            try:
                wait = float((query.get("wait") or [0])[0])
            except ValueError:
                raise Invalid("wait is a number of seconds") from None
            if not 0 <= wait <= 60:
                raise Invalid("wait is 0 to 60 seconds")
            return 200, await self.jobs.wait(parts[2], wait)
        if parts == ["v1", "jobs"] and method == "POST":
            kind, group = _str(body, "kind"), _str(body, "group")
            if kind == "restore":
                self.target.group(group)  # 404 now, not in the job
                if body.get("disk") not in [d for d in self.target.status()[group]["disks"]]:
                    raise NotFound("group %s has no disk %s" % (group, body.get("disk")))
                return 202, self.jobs.start(kind, group, self._restore(group, body),
                                            self._restore_progress(group, body))
            if kind == "wait":
                timeout = body.get("timeout", 600)
                if not isinstance(timeout, (int, float)) or timeout < 0:
                    raise Invalid("timeout must be a number of seconds")
                if group not in self.source.status():
                    raise NotFound("no group %s on this site" % group)
                return 202, self.jobs.start(kind, group, lambda: self.source.wait_synced(
                    group, float(timeout)), self._wait_progress(group))
            if kind == "failover":
                self.target.group(group)
                return 202, self.jobs.start("failover-%s" % body.get("mode"), group,
                                            self._failover(group, body))
            raise Invalid("kind must be restore, wait or failover")
        raise NotFound("no such endpoint: %s /%s" % (method, "/".join(parts)))

    def _watcher(self) -> Watcher:
        if self.watcher is None:
            raise Unavailable("the agent's watcher is not running")
        return self.watcher

    async def _events(self, query: Dict[str, list]) -> Dict[str, Any]:
        """Long poll: events after ``after`` (default: from now on when ``wait`` is given,
        else everything kept), waiting up to ``wait`` seconds (at most 60) for one."""
        events = self._watcher().events
        try:
            after = int((query.get("after") or [-1])[0])
            wait = float((query.get("wait") or [0])[0])
            limit = int((query.get("limit") or [1000])[0])
        except ValueError:
            raise Invalid("after and limit are integers, wait a number of seconds") from None
        if not 0 <= wait <= 60 or not 1 <= limit <= 10000:
            raise Invalid("wait is 0 to 60 seconds, limit 1 to 10000 events")
        if after < 0:
            after = 0
        items, lost = await events.wait(after, wait, limit) if wait else \
            events.since(after, limit)
        return {"events": items, "lost": lost, "last_id": events.last_id}

    def overview(self, st: Dict[str, Any]) -> Dict[str, Any]:
        """What the dashboard draws: the status, and what the watcher derived over time."""
        w = self._watcher()
        return {"status": st, "rates": w.rates(), "alerts": w.alerts.active(),
                "rpo_history": {g: w.rpo_history(g) for g in st["groups"]},
                "events": w.events.latest(50), "pairs": self.trust.status()}

    async def status_async(self) -> Dict[str, Any]:
        """The status for the watcher: site B's part in a worker thread, since a busy group
        makes it wait up to 0.2 s for its lock, which must not stall the event loop."""
        replicas = await trio.to_thread.run_sync(self.target.status)
        return self.status(replicas=replicas)

    def status(self, group: Optional[str] = None,
               replicas: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
        groups = self.source.status()
        if self.watcher is not None:
            for g, gs in groups.items():
                for d, ds in gs["disks"].items():
                    p = self.watcher.progress(g, d)
                    ds["delivered_progress"] = p["progress"] if p else None
                    ds["delivered_eta_seconds"] = p["eta_seconds"] if p else None
        if replicas is None:
            replicas = self.target.status()
        if group is not None:
            if group not in groups and group not in replicas:
                raise NotFound("no group %s on this site" % group)
            groups = {k: v for k, v in groups.items() if k == group}
            replicas = {k: v for k, v in replicas.items() if k == group}
        out = {"site": self.site, "uptime_seconds": round(time.time() - self.started, 1),
               "groups": groups, "replicas": replicas}
        out["security"] = {"mode": "insecure" if self.trust.insecure else "tls",
                           "fingerprint": self.trust.identity.fingerprint,
                           "paired_sites": [p.site for p in self.trust.peers()]}
        return out

    def metrics(self, st: Dict[str, Any]) -> bytes:
        return metrics.exposition(metrics.StatusCollector(lambda: st, self.watcher, version()))


async def _read_body(receive: Callable) -> Dict[str, Any]:
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Invalid("client went away")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_REQUEST:
            raise TooLarge("request body over %d bytes" % MAX_REQUEST)
        chunks.append(chunk)
        if not message.get("more_body"):
            break
    raw = b"".join(chunks)
    if not raw:
        return {}
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise Invalid("request body is not JSON: %s" % e) from None
    if not isinstance(obj, dict):
        raise Invalid("request body must be a JSON object")
    return obj


def _str(body: Dict[str, Any], key: str) -> str:
    value = body.get(key)
    if not isinstance(value, str) or not value:
        raise Invalid("%s is required" % key)
    return value


def _point(body: Dict[str, Any]) -> Tuple[Optional[str], Optional[int]]:
    """The point a request names: a checkpoint id or tag, or a wall time (ns)."""
    ref = body.get("checkpoint")
    at = body.get("at_ns")
    if ref is not None and (not isinstance(ref, str) or not ref):
        raise Invalid("checkpoint must be an id or a tag")
    if at is not None and (not isinstance(at, int) or isinstance(at, bool)):
        raise Invalid("at_ns must be an integer")
    if ref is not None and at is not None:
        raise Invalid("give a checkpoint or a time, not both")
    return ref, at


def _bandwidth(body: Dict[str, Any]) -> int:
    value = body.get("bandwidth")
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise Invalid("bandwidth must be a number of bytes per second (0: no limit)")
    return value


def _positive_int(body: Dict[str, Any], key: str) -> int:
    value = body.get(key)
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise Invalid("%s must be a positive integer" % key)
    return value
