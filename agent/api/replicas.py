"""The target site's endpoints of recovery: views (``/v1/replicas/NAME/views``,
``/v1/views/ID``), failover, restore and file-level mounts (``/v1/replicas/NAME/mounts``,
``/v1/umount``), each at a point in time; and the work of a failover or a restore, which a
job (``jobs.py``) runs as well."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple

from ..domains import vms
from ..errors import Invalid
from ..target import live
from ..target.restore import copied
from .request import name_of, path_of, point_of, ranges_of, shown

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "views" \
            and method == "POST":
        return 201, await api.target.open_view(parts[2], *point_of(body))
    if len(parts) == 3 and parts[:2] == ["v1", "views"] and method == "DELETE":
        return 200, await api.target.close_view(parts[2])
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "failover" \
            and method == "POST":
        work = failover(api, parts[2], body)
        return (201 if body.get("mode") == "test" else 200), await work()
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "restore" \
            and method == "POST":
        return 200, await restore(api, parts[2], body)()
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "mounts" \
            and method == "POST":
        disk, directory, point = name_of(body, "disk"), path_of(body, "dir"), point_of(body)
        return 201, await api.target.mount(parts[2], disk, directory, *point)
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "repair" \
            and method == "POST":
        return 200, api.target.repair(parts[2], name_of(body, "disk"), ranges_of(body))
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "scrub" \
            and method == "POST":
        one = name_of(body, "disk") if body.get("disk") is not None else None
        return 200, await api.target.scrub(parts[2], one)
    if parts == ["v1", "umount"] and method == "POST":
        return 200, await api.target.umount(path_of(body, "dir"))
    return None


def failover(api: Api, group: str, body: Dict[str, Any]) -> Callable[[], Awaitable[Any]]:
    """A failover step, with the group's libvirt domains started or removed around it."""
    return vms.around(api, group, body, _failover(api, group, body))


def _failover(api: Api, group: str, body: Dict[str, Any]) -> Callable[[], Awaitable[Any]]:
    mode = body.get("mode")
    point = point_of(body)
    if mode == "test":
        return lambda: api.target.open_view(group, *point, test=True)
    if mode == "stop-test":
        return lambda: api.target.stop_test(group)
    if mode == "live":
        return lambda: api.target.failover_live(group, *point)
    if mode in ("commit", "rollback"):
        if point != (None, None):
            raise Invalid("failover --%s takes no point" % mode)
        step = live.commit if mode == "commit" else live.rollback
        return lambda: step(api.target, group)
    raise Invalid("mode must be test, stop-test, live, commit or rollback, not %s"
                  % shown(mode))


def restore(api: Api, group: str, body: Dict[str, Any]) -> Callable[[], Awaitable[Any]]:
    disk, to, point = name_of(body, "disk"), path_of(body, "to"), point_of(body)
    return lambda: api.target.restore(group, disk, to, *point)


def restore_progress(api: Api, group: str, body: Dict[str, Any]
                     ) -> Callable[[], Optional[Dict[str, Any]]]:
    """A restore's progress: bytes of the replica copied so far (its allocated bytes;
    the journal's overlay written after is not counted)."""
    replica = api.target.status()[group]["disks"][body["disk"]]["replica"]

    def progress() -> Optional[Dict[str, Any]]:
        total = os.stat(replica).st_blocks * 512
        done = copied(body["to"])
        if done is None:
            done = total if os.path.exists(body["to"]) else 0
        return {"progress": round(min(1.0, done / total), 4) if total else 1.0,
                "done_bytes": done, "total_bytes": total, "eta_seconds": None}
    return progress
