"""The endpoints that report on the site: ``/v1/status``, ``/metrics``, ``/healthz``,
``/v1/events`` (a long poll), ``/v1/alerts``, ``/v1/overview`` (the dashboard's) and
``/v1/dashboard-url``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import Forbidden, Invalid, NotFound

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if parts == ["v1", "status"] and method == "GET":
        return 200, api.status((query.get("group") or [None])[0])
    if parts == ["metrics"] and method == "GET":
        return 200, api.metrics(await api.status_async())
    if parts == ["healthz"] and method == "GET":
        return 200, {"ok": True, "site": api.site}
    if parts == ["v1", "events"] and method == "GET":
        return 200, await _events(api, query)
    if parts == ["v1", "alerts"] and method == "GET":
        return 200, api._watcher().alerts_document()
    if parts == ["v1", "overview"] and method == "GET":
        api._watcher()  # 503 before any work when it is not running
        return 200, api.overview(await api.status_async())
    if parts == ["v1", "dashboard-url"] and method == "GET":
        if api._policy != "local":
            raise Forbidden("the dashboard's login address is told on the local socket "
                            "only")
        if not api.dashboard_urls:
            raise NotFound("no TCP listener: start the agent with --api 127.0.0.1:PORT "
                           "(or https://HOST:PORT) to serve the dashboard")
        return 200, {"urls": api.dashboard_urls}
    return None


async def _events(api: Api, query: Dict[str, list]) -> Dict[str, Any]:
    """Long poll: events after ``after`` (default: from now on when ``wait`` is given,
    else everything kept), waiting up to ``wait`` seconds (at most 60) for one."""
    events = api._watcher().events
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
