"""The endpoints of the source site's protected groups: protect, settings, pause and
resume, unprotect, wait, checkpoints and the RPO alert (``/v1/groups/...``), and the
checkpoints of a group on either side (``/v1/checkpoints/NAME``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

from formats.images import REPLICA_FORMATS

from ..errors import Invalid, NotFound
from ..protocol.frames import MAX_DISKS
from ..protocol.messages import MAX_HISTORY, MAX_JOURNAL
from ..source.failback import failback
from ..source.move import move
from ..source.resize import resize
from ..source.resync import resync
from ..source.splitters import MAX_SPLITTER_THREADS
from ..source.verify import verify
from .request import (
    bandwidth_of,
    bool_of,
    int_of,
    is_name,
    name_of,
    only,
    parse_address,
    path_of,
    path_value,
    ranges_of,
    seconds_of,
    shown,
    str_of,
    tag_of,
)

MAX_QUEUE = 1 << 40  # queue_bytes: what the source may hold in memory for a group

if TYPE_CHECKING:
    from .app import Api


async def route(api: Api, method: str, parts: List[str], query: Dict[str, list],
                body: Dict[str, Any]) -> Optional[Tuple[int, Any]]:
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "alerts" \
            and method == "POST":
        if set(body) != {"rpo_alert"}:
            raise Invalid("alert settings: rpo_alert (seconds, or null for none)")
        value = None if body["rpo_alert"] is None else \
            seconds_of(body, "rpo_alert", positive=True)
        if parts[2] not in api.source.status():
            raise NotFound("no group %s on this site" % parts[2])
        return 200, api._watcher().set_rpo_alert(parts[2], value)
    if parts == ["v1", "groups"] and method == "POST":
        return 201, await _protect(api, body)
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "settings" \
            and method == "POST":
        if len(body) != 1 or not set(body) <= {"bandwidth", "replica_format"}:
            raise Invalid("settings that change at run time, one at a time: bandwidth, "
                          "replica_format")
        if "replica_format" in body:
            return 200, api.source.set_replica_format(parts[2], replica_format_of(body))
        return 200, api.source.set_bandwidth(parts[2], bandwidth_of(body))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] in ("pause", "resume") \
            and method == "POST":
        return 200, api.source.set_paused(parts[2], parts[3] == "pause")
    if len(parts) == 3 and parts[:2] == ["v1", "groups"] and method == "DELETE":
        return 200, await api.source.unprotect(parts[2])
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "wait" \
            and method == "POST":
        return 200, await api.source.wait_synced(parts[2], seconds_of(body, "timeout", 600.0))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "checkpoints" \
            and method == "POST":
        return 200, await api.source.checkpoint(parts[2], tag_of(body),
                                                seconds_of(body, "timeout", 30.0))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "resync" \
            and method == "POST":
        return 200, await resync(api.source, parts[2], name_of(body, "disk"), ranges_of(body))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "resize" \
            and method == "POST":
        only(body, ("disk",), "resize")
        return 200, await resize(api.source, parts[2], name_of(body, "disk"))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "verify" \
            and method == "POST":
        return 200, await _verify(api, parts[2], body)
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "move" \
            and method == "POST":
        return 200, await move(api.source, parts[2], seconds_of(body, "timeout", 120.0))
    if len(parts) == 4 and parts[:2] == ["v1", "groups"] and parts[3] == "failback" \
            and method == "POST":
        only(body, ("target", "timeout", "wait"), "failback")
        address = str_of(body, "target", 300) if body.get("target") is not None else None
        if address is not None:
            parse_address(address, "target")
        return 200, await failback(api.source, api.target, parts[2], address,
                                   seconds_of(body, "timeout", 600.0),
                                   bool_of(body, "wait", True))
    if len(parts) == 3 and parts[:2] == ["v1", "checkpoints"] and method == "GET":
        name = parts[2]
        src = api.source.checkpoints(name) if name in api.source.shippers else None
        tgt = api.target.checkpoints(name) if name in api.target.groups else None
        if src is None and tgt is None:
            raise NotFound("no group %s on this site" % name)
        return 200, {"group": name, "source": src, "target": tgt}
    return None


async def _verify(api: Api, name: str, body: Dict[str, Any]) -> Any:
    only(body, ("disk", "chunk", "rounds", "settle", "repair"), "verify")
    disk = name_of(body, "disk") if "disk" in body else None
    return await verify(api.source, name, disk, int_of(body, "chunk", 4096, 1 << 26, 1 << 20),
                        int_of(body, "rounds", 1, 100, 4),
                        seconds_of(body, "settle", 1.0, high=600.0),
                        bool_of(body, "repair"))


PROTECT_FIELDS = ("name", "target", "disks", "allow_unreachable", "queue_bytes", "history_s",
                  "journal_max", "journal_reserve", "checkpoint_interval", "bandwidth", "seeds",
                  "splitter_threads", "replica_format")


def replica_format_of(body: Dict[str, Any]) -> str:
    fmt = str_of(body, "replica_format", 16)
    if fmt not in REPLICA_FORMATS:
        raise Invalid("replica_format %s: choose one of %s"
                      % (shown(fmt), ", ".join(REPLICA_FORMATS)))
    return fmt


async def _protect(api: Api, body: Dict[str, Any]) -> Any:
    only(body, PROTECT_FIELDS, "protect")
    name = name_of(body, "name", "group")
    target = str_of(body, "target", 300)
    parse_address(target, "target")
    disks = body.get("disks")
    if not isinstance(disks, list) or not 0 < len(disks) <= MAX_DISKS or not all(
            isinstance(d, dict) and set(d) == {"name", "path"} for d in disks):
        raise Invalid("disks must be a list of 1 to %d {name, path}" % MAX_DISKS)
    pairs = [(name_of(d, "name", "disk"), path_of(d, "path")) for d in disks]
    kwargs: Dict[str, Any] = {}
    if "queue_bytes" in body:
        kwargs["queue_bytes"] = int_of(body, "queue_bytes", 1, MAX_QUEUE)
    settings: Dict[str, Any] = {}
    if "history_s" in body:
        settings["history_s"] = int_of(body, "history_s", 1, MAX_HISTORY - 1)
    if "journal_max" in body:
        settings["journal_max"] = int_of(body, "journal_max", 1, MAX_JOURNAL - 1)
    if bool_of(body, "journal_reserve"):  # site B preallocates journal_max (journal.md)
        settings["journal_reserve"] = True
    if "checkpoint_interval" in body:
        settings["checkpoint_interval"] = seconds_of(body, "checkpoint_interval")
    if "bandwidth" in body:
        settings["bandwidth"] = bandwidth_of(body)
    if "splitter_threads" in body:  # requests each disk's splitter serves at once
        settings["splitter_threads"] = int_of(body, "splitter_threads", 1, MAX_SPLITTER_THREADS)
    if "replica_format" in body:  # site B keeps its replicas in this format too
        settings["replica_format"] = replica_format_of(body)
    kwargs["settings"] = settings
    seeds = body.get("seeds", {})
    if not isinstance(seeds, dict) or len(seeds) > MAX_DISKS or not all(
            is_name(k) for k in seeds):
        raise Invalid("seeds must be an object {disk: path on the target site}")
    kwargs["seeds"] = {k: path_value(p, "seed of disk %s" % k) for k, p in seeds.items()}
    return await api.source.protect(
        name, pairs, target, allow_unreachable=bool_of(body, "allow_unreachable"), **kwargs)


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
