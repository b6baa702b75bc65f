"""The endpoints of the source site's protected groups: protect, settings, pause and
resume, unprotect, wait, checkpoints and the RPO alert (``/v1/groups/...``), and the
checkpoints of a group on either side (``/v1/checkpoints/NAME``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from ..errors import Invalid, NotFound
from .request import bandwidth_of, positive_int_of, str_of

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "alerts" \
            and method == "POST":
        if set(body) != {"rpo_alert"}:
            raise Invalid("alert settings: rpo_alert (seconds, or null for none)")
        value = body["rpo_alert"]
        if value is not None and (not isinstance(value, (int, float))
                                  or isinstance(value, bool) or value <= 0):
            raise Invalid("rpo_alert must be a positive number of seconds or null")
        if parts[2] not in api.source.status():
            raise NotFound("no group %s on this site" % parts[2])
        return 200, api._watcher().set_rpo_alert(parts[2], value)
    if parts == ["v1", "groups"] and method == "POST":
        return 201, await _protect(api, body)
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "settings" \
            and method == "POST":
        if set(body) != {"bandwidth"}:
            raise Invalid("settings that change at run time: bandwidth")
        return 200, api.source.set_bandwidth(parts[2], bandwidth_of(body))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] in ("pause", "resume") \
            and method == "POST":
        return 200, api.source.set_paused(parts[2], parts[3] == "pause")
    if len(parts) == 3 and parts[:2] == ["v1", "groups"] and method == "DELETE":
        return 200, await api.source.unprotect(parts[2])
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "wait" \
            and method == "POST":
        timeout = body.get("timeout", 600)
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise Invalid("timeout must be a number of seconds")
        return 200, await api.source.wait_synced(parts[2], float(timeout))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "checkpoints" \
            and method == "POST":
        tag = body.get("tag")
        if tag is not None and not isinstance(tag, str):
            raise Invalid("tag must be a string")
        timeout = body.get("timeout", 30)
        if not isinstance(timeout, (int, float)) or timeout < 0:
            raise Invalid("timeout must be a number of seconds")
        return 200, await api.source.checkpoint(parts[2], tag, float(timeout))
    if len(parts) == 3 and parts[:2] == ["v1", "checkpoints"] and method == "GET":
        name = parts[2]
        src = api.source.checkpoints(name) if name in api.source.shippers else None
        tgt = api.target.checkpoints(name) if name in api.target.groups else None
        if src is None and tgt is None:
            raise NotFound("no group %s on this site" % name)
        return 200, {"group": name, "source": src, "target": tgt}
    return None


async def _protect(api: Api, body: Dict[str, Any]) -> Any:
    disks = body.get("disks")
    if not isinstance(disks, list) or not all(
            isinstance(d, dict) and isinstance(d.get("name"), str)
            and isinstance(d.get("path"), str) for d in disks):
        raise Invalid("disks must be a list of {name, path}")
    kwargs: Dict[str, Any] = {}
    if "queue_bytes" in body:
        kwargs["queue_bytes"] = positive_int_of(body, "queue_bytes")
    settings: Dict[str, Any] = {}
    for key in ("history_s", "journal_max"):
        if key in body:
            settings[key] = positive_int_of(body, key)
    if "checkpoint_interval" in body:
        interval = body["checkpoint_interval"]
        if not isinstance(interval, (int, float)) or isinstance(interval, bool) \
                or interval < 0:
            raise Invalid("checkpoint_interval must be a number of seconds")
        settings["checkpoint_interval"] = float(interval)
    if "bandwidth" in body:
        settings["bandwidth"] = bandwidth_of(body)
    kwargs["settings"] = settings
    seeds = body.get("seeds", {})
    if not isinstance(seeds, dict) or not all(
            isinstance(p, str) and p for p in seeds.values()):
        raise Invalid("seeds must be an object {disk: path on the target site}")
    kwargs["seeds"] = seeds
    return await api.source.protect(
        str_of(body, "name"), [(d["name"], d["path"]) for d in disks],
        str_of(body, "target"), allow_unreachable=bool(body.get("allow_unreachable")),
        **kwargs)


def wait_progress(api: Api, group: str) -> Callable[[], Optional[Dict[str, Any]]]:
    """A wait's progress: the group's initial sync or resync, as the watcher sees it."""
    def progress() -> Optional[Dict[str, Any]]:
        if api.watcher is None:
            return None
        disks = api.source.status().get(group, {}).get("disks", {})
        ps = [p for p in (api.watcher.progress(group, d) for d in disks) if p]
        if not ps:
            return None
        done = sum(p["delivered_bytes"] for p in ps)
        total = sum(p["total_bytes"] for p in ps)
        etas = [p["eta_seconds"] for p in ps]
        return {"progress": round(done / total, 4) if total else 0.0, "done_bytes": done,
                "total_bytes": total,
                "eta_seconds": None if None in etas else max(etas)}
    return progress
