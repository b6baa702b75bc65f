"""The endpoints of jobs (``/v1/jobs``): a restore, a wait or a failover started on the
agent (``agent/jobs.py``), listed, and waited for."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from ..errors import Invalid, NotFound, Unavailable
from . import groups, replicas
from .request import name_of, seconds_of, shown, str_of

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
        if not 0 <= wait <= 60:  # NaN and infinities fail this too
            raise Invalid("wait is 0 to 60 seconds")
        return 200, await api.jobs.wait(parts[2], wait)
    if parts == ["v1", "jobs"] and method == "POST":
        kind, group = str_of(body, "kind"), name_of(body, "group")
        if kind == "restore":
            api.target.group(group)  # 404 now, not in the job
            disk = name_of(body, "disk")
            if disk not in [d for d in api.target.status()[group]["disks"]]:
                raise NotFound("group %s has no disk %s" % (group, disk))
            return 202, api.jobs.start(kind, group, replicas.restore(api, group, body),
                                       replicas.restore_progress(api, group, body))
        if kind == "wait":
            timeout = seconds_of(body, "timeout", 600.0)
            if group not in api.source.status():
                raise NotFound("no group %s on this site" % group)
            return 202, api.jobs.start(kind, group, lambda: api.source.wait_synced(
                group, timeout), groups.wait_progress(api, group))
        if kind == "failover":
            api.target.group(group)
            work = replicas.failover(api, group, body)  # the mode checked before the job
            return 202, api.jobs.start("failover-%s" % body.get("mode"), group, work)
        raise Invalid("kind must be restore, wait or failover, not %s" % shown(kind))
    raise NotFound("no such endpoint: %s /%s" % (method, "/".join(parts)))
