"""The endpoints of jobs (``/v1/jobs``): a restore, a wait or a failover started on the
agent (``agent/jobs.py``), listed, and waited for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import Invalid, NotFound, Unavailable
from . import groups, replicas
from .request import str_of

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if parts[:2] != ["v1", "jobs"]:
        return None
    if api.jobs is None:
        raise Unavailable("the agent's job runner is not running")
    if parts == ["v1", "jobs"] and method == "GET":
        return 200, {"jobs": api.jobs.list()}
    if len(parts) == 3 and method == "GET":
        try:
            wait = float((query.get("wait") or [0])[0])
        except ValueError:
            raise Invalid("wait is a number of seconds") from None
        if not 0 <= wait <= 60:
            raise Invalid("wait is 0 to 60 seconds")
        return 200, await api.jobs.wait(parts[2], wait)
    if parts == ["v1", "jobs"] and method == "POST":
        kind, group = str_of(body, "kind"), str_of(body, "group")
        if kind == "restore":
            api.target.group(group)  # 404 now, not in the job
            if body.get("disk") not in [d for d in api.target.status()[group]["disks"]]:
                raise NotFound("group %s has no disk %s" % (group, body.get("disk")))
            return 202, api.jobs.start(kind, group, replicas.restore(api, group, body),
                                       replicas.restore_progress(api, group, body))
        if kind == "wait":
            timeout = body.get("timeout", 600)
            if not isinstance(timeout, (int, float)) or timeout < 0:
                raise Invalid("timeout must be a number of seconds")
            if group not in api.source.status():
                raise NotFound("no group %s on this site" % group)
            return 202, api.jobs.start(kind, group, lambda: api.source.wait_synced(
                group, float(timeout)), groups.wait_progress(api, group))
        if kind == "failover":
            api.target.group(group)
            return 202, api.jobs.start("failover-%s" % body.get("mode"), group,
                                       replicas.failover(api, group, body))
        raise Invalid("kind must be restore, wait or failover")
    raise NotFound("no such endpoint: %s /%s" % (method, "/".join(parts)))
