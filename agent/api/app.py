"""The API's ASGI application: ``Api`` holds what the endpoints serve (the source and
target sites, the trust, the watcher and the job runner), reads a request, hands it to
the routes of each family in turn (``monitoring``, ``groups``, ``pairing``, ``replicas``,
``jobs``) and writes the answer as JSON; an error becomes ``{"error", "kind"}`` with its
HTTP status (``errors.http_status``). It also builds the status document the watcher,
the metrics and the dashboard read.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple
from urllib.parse import parse_qs, unquote

from .. import metrics
from ..dashboard import Files
from ..errors import FerryError, Invalid, NotFound, Unavailable, http_status, kind_of
from ..pairing import Trust
from ..protocol import frames
from ..source import SourceSite
from ..target import TargetSite
from .domains import route as domain_routes
from .groups import route as group_routes
from .jobs import route as job_routes
from .monitoring import route as monitoring_routes
from .pairing import route as pairing_routes
from .replicas import route as replica_routes
from .request import read_body

if TYPE_CHECKING:
    from ..domains import Domains
    from ..jobs import Jobs
    from ..watch import Watcher


def version() -> str:
    try:
        from importlib.metadata import version as dist_version
        return dist_version("ferry")
    except Exception:  # a source tree, not installed
        return "0.1.0"

log = logging.getLogger("ferry.api")

MAX_PATH_PART = 1024  # a name or an id in a request's path


def encode(payload: Any) -> bytes:
    """An answer as strict JSON: a NaN or an infinity anywhere is a bug here, refused
    (ValueError) rather than sent as something no strict parser reads."""
    return (json.dumps(payload, indent=1, sort_keys=True, allow_nan=False) + "\n").encode()


def query_of(raw: bytes) -> Dict[str, list]:
    """A request's query parameters; Invalid for bytes that are not UTF-8 or hold a NUL."""
    try:
        query = parse_qs(raw.decode("utf-8"), errors="strict")
    except (UnicodeDecodeError, ValueError):
        raise Invalid("the query string is not UTF-8") from None
    if any("\0" in k or any("\0" in v for v in vs) for k, vs in query.items()):
        raise Invalid("the query string has a NUL")
    return query


def answer_for(exc: Exception) -> Tuple[int, Dict[str, str]]:
    """The status and the one-line error for what a request raised. An exception group
    of one (a nursery's) is answered as the exception inside it."""
    inner = getattr(exc, "exceptions", None)  # an ExceptionGroup (3.11, or trio's backport)
    while isinstance(inner, tuple) and len(inner) == 1 and isinstance(inner[0], Exception):
        exc = inner[0]
        inner = getattr(exc, "exceptions", None)
    if isinstance(exc, frames.RemoteError):  # the other site refused: its reason, not a 5xx
        return 409, {"error": one_line("the other site refused: %s" % exc),
                     "kind": "PeerRefused"}
    if isinstance(exc, FerryError):
        return http_status(exc), {"error": one_line(str(exc) or type(exc).__name__),
                                  "kind": kind_of(exc)}
    log.error("request failed", exc_info=exc)
    if isinstance(exc, OSError):
        return 500, {"error": one_line("%s: %s" % (type(exc).__name__, exc))}
    # a bug: say so in one line, keep the agent serving
    return 500, {"error": "internal error (%s); see the agent's log" % type(exc).__name__}


def one_line(text: str) -> str:
    return " ".join(text.split()) or "error"

# A family's routes: its answer (status, payload), or None when the request is not theirs.
Route = Callable[["Api", str, List[str], Dict[str, list], Dict[str, Any]],
                 Awaitable[Optional[Tuple[int, Any]]]]
ROUTES: Tuple[Route, ...] = (monitoring_routes, domain_routes, group_routes, pairing_routes,
                             replica_routes, job_routes)


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
        self.domains: Optional[Domains] = None  # libvirt domains (agent/domains/)
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
            body = await read_body(receive)
            status, payload = await self._route(scope["method"], scope["path"],
                                                query_of(scope.get("query_string", b"")), body)
        except Exception as e:
            status, payload = answer_for(e)
        if isinstance(payload, bytes):
            data = payload
            ctype = metrics.CONTENT_TYPE.encode()
        else:
            try:
                data, ctype = encode(payload), b"application/json"
            except ValueError as e:  # a NaN or an infinity in an answer: a bug here
                log.error("%s %s: answer is not strict JSON: %s", scope["method"],
                          scope["path"], e)
                status, ctype = 500, b"application/json"
                data = encode({"error": "internal error (the answer is not strict JSON); "
                                        "see the agent's log", "kind": "FerryError"})
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", ctype),
                                (b"content-length", str(len(data)).encode())]})
        await send({"type": "http.response.body", "body": data})

    async def _route(self, method: str, path: str, query: Dict[str, list],
                     body: Dict[str, Any]) -> Tuple[int, Any]:
        try:
            parts = [unquote(p, errors="strict") for p in path.strip("/").split("/")]
        except UnicodeDecodeError:
            raise Invalid("the request path is not UTF-8") from None
        if any("\0" in p or len(p) > MAX_PATH_PART for p in parts):
            raise Invalid("the request path has a NUL or a part longer than %d characters"
                          % MAX_PATH_PART)
        for route in ROUTES:
            answer = await route(self, method, parts, query, body)
            if answer is not None:
                return answer
        raise NotFound("no such endpoint: %s %s" % (method, path))

    def _watcher(self) -> Watcher:
        if self.watcher is None:
            raise Unavailable("the agent's watcher is not running")
        return self.watcher

    def overview(self, st: Dict[str, Any]) -> Dict[str, Any]:
        """What the dashboard draws: the status, and what the watcher derived over time."""
        w = self._watcher()
        return {"status": st, "rates": w.rates(), "alerts": w.alerts.active(),
                "rpo_history": {g: w.rpo_history(g) for g in st["groups"]},
                "events": w.events.latest(50), "pairs": self.trust.status()}

    async def status_async(self) -> Dict[str, Any]:
        """The status for the watcher and the metrics. Made on the event loop: neither part
        waits on anything (a target group answers from its last published snapshot, never
        taking its lock; the source's groups come from the store's copy), and no worker
        thread is taken from the data path for it."""
        return self.status()

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
