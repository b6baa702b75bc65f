"""The target site's endpoints of recovery: views (``/v1/replicas/NAME/views``,
``/v1/views/ID``), failover, restore and file-level mounts (``/v1/replicas/NAME/mounts``,
``/v1/umount``), each at a point in time; and the work of a failover or a restore, which a
job (``jobs.py``) runs as well."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Dict, List, Optional, Tuple

import trio

from formats import images

from ..domains import vms
from ..errors import Invalid
from ..protocol.messages import MAX_JOURNAL
from ..target import live, splitbrain
from ..target.restore import copied
from .request import (
    bool_of,
    int_of,
    is_name,
    name_of,
    only,
    path_of,
    path_value,
    point_of,
    ranges_of,
    shown,
    str_of,
)

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "views" \
            and method == "POST":
        return 201, await api.target.open_view(parts[2], *point_of(body),
                                               overlays=overlays_of(api, parts[2], body))
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
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "rebuild-meta" \
            and method == "POST":
        order = body.get("disks")
        if order is not None and not (isinstance(order, list) and order
                                      and all(isinstance(n, str) for n in order)):
            raise Invalid("disks is a list of the group's disk names, in group order")
        return 200, await api.target.rebuild_meta(parts[2], order)
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "scrub" \
            and method == "POST":
        one = name_of(body, "disk") if body.get("disk") is not None else None
        return 200, await api.target.scrub(parts[2], one)
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "resolve" \
            and method == "POST":
        return 200, await resolve(api, parts[2], body)
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "journal-volume" \
            and method == "POST":
        only(body, ("device", "journal_max"), "journal-volume")
        if not is_name(parts[2]):
            raise Invalid("group name %s: use letters, digits, '_', '.', '-'" % shown(parts[2]))
        return 201, await api.target.journal_volume(
            parts[2], path_of(body, "device"), int_of(body, "journal_max", 1, MAX_JOURNAL - 1))
    if len(parts) == 4 and parts[:2] == ["v1", "replicas"] and parts[3] == "journal-volume" \
            and method == "DELETE":
        if not is_name(parts[2]):
            raise Invalid("group name %s: use letters, digits, '_', '.', '-'" % shown(parts[2]))
        return 200, await api.target.release_journal_volume(parts[2])
    if parts == ["v1", "umount"] and method == "POST":
        return 200, await api.target.umount(path_of(body, "dir"))
    return None


def overlays_of(api: Api, group: str, body: Dict[str, Any]) -> Optional[Dict[str, str]]:
    """A view's ``overlay``: a file (a group of one disk) or ``{disk: file}``."""
    value = body.get("overlay")
    if value is None:
        return None
    if isinstance(value, str):
        disks = [d.name for d in api.target.group(group).disks]
        if len(disks) != 1:
            raise Invalid("group %s has %d disks (%s): name each overlay's disk "
                          "(DISK=FILE)" % (group, len(disks), ", ".join(disks)))
        value = {disks[0]: value}
    if not isinstance(value, dict) or not value or len(value) > 64:
        raise Invalid("overlay must be a file, or an object of 1 to 64 {disk: file}")
    for disk, path in value.items():
        if not is_name(disk):
            raise Invalid("overlay: disk name %s: use letters, digits, '_', '.', '-'"
                          % shown(disk))
        path_value(path, "overlay of disk %s" % disk)
    return dict(value)


async def resolve(api: Api, group: str, body: Dict[str, Any]) -> Dict[str, Any]:
    """A split brain's survivor (``{keep: a|b}``, site B) or its kept copies dropped
    (``{drop_kept: true}``, either site)."""
    only(body, ("keep", "drop_kept"), "resolve")
    if not is_name(group):
        raise Invalid("group name %s: use letters, digits, '_', '.', '-'" % shown(group))
    if bool_of(body, "drop_kept") == ("keep" in body):
        raise Invalid("resolve takes keep (a or b) or drop_kept, one of them")
    if "keep" in body:
        return await splitbrain.resolve(api.target, group, str_of(body, "keep", 8))
    data_dir = os.path.dirname(api.target.root)
    return await trio.to_thread.run_sync(splitbrain.drop_kept, data_dir, group)


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
    fmt = str_of(body, "format", 16) if body.get("format") is not None else images.RAW
    subformat = str_of(body, "subformat", 32) if body.get("subformat") is not None else None
    compress = bool_of(body, "compress")
    try:  # refused now, not in the job
        images.convert_command("", "", fmt, subformat, compress)
    except images.Unsupported as e:
        raise Invalid("restore of group %s disk %s: %s" % (group, disk, e)) from None
    if fmt == images.RAW:  # the sparse copy of the replica and the journal (restore.py)
        return lambda: api.target.restore(group, disk, to, *point)
    return lambda: api.target.restore(group, disk, to, *point, fmt=fmt, subformat=subformat,
                                      compress=compress)


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
