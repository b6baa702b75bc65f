"""What ``ferry status --json`` shows of the groups this site protects (their source role).

The fields and their meaning are a stable contract (scripts read them); states are
``states.py``'s strings.
"""

from __future__ import annotations

from typing import Any, Dict, Iterable, Mapping, Optional

from ..store import DiskRow, GroupRow
from . import splitters
from .link import DiskLink
from .settings import DEFAULT_SETTINGS
from .shipper import GroupShipper
from .splitters import Fleet
from .states import disk_state, group_state


def group_info(row: GroupRow, fleet: Fleet) -> Dict[str, Any]:
    """A group as ``protect`` answers it."""
    return {"group": row.name, "target": row.target,
            "disks": [{"name": d.name, "path": d.path, "size": d.size,
                       "nbd_uri": fleet.paths(d).nbd_uri}
                      for d in row.disks]}


def site_status(rows: Iterable[GroupRow], shippers: Mapping[str, GroupShipper],
                links: Mapping[str, DiskLink], fleet: Fleet, now: float) -> Dict[str, Any]:
    out = {}
    for row in rows:
        shipper = shippers.get(row.name)
        disks = {}
        for d in row.disks:
            link = links.get(d.id)
            if link is None:
                continue
            disks[d.name] = disk_status(row, d, link, shipper, fleet, now)
        book = shipper.book if shipper else None
        out[row.name] = {
            "role": "source",
            "state": group_state(v["state"] for v in disks.values()),
            "target": row.target,
            "error": shipper.error if shipper else None,
            "link": shipper.link_status() if shipper else None,
            "fenced": shipper.fence_status() if shipper else None,
            "rpo_seconds": max((v["rpo_seconds"] for v in disks.values()), default=0.0),
            "bytes_sent": shipper.bytes_sent if shipper else 0,
            "bytes_received": shipper.bytes_received if shipper else 0,
            "settings": {k: v for k, v in dict(DEFAULT_SETTINGS, **row.settings).items()
                         if k != "domains"},  # (definitions: agent/domains/travel.py)
            "checkpoints_made": len(book.made) if book else 0,
            "checkpoints_unacked": len(book.unacked) if book else 0,
            "last_checkpoint": book.made[-1] if book and book.made else None,
            "disks": disks,
        }
    return out


def disk_status(row: GroupRow, d: DiskRow, link: DiskLink, shipper: Optional[GroupShipper],
                fleet: Fleet, now: float) -> Dict[str, Any]:
    c = link.counters if link.connected else {}
    stale = now - link.counters_at if link.counters_at else 0.0
    backlog = bool(c.get("queued_records") or c.get("inconsistent"))
    rpo = c.get("lag_ns", 0) / 1e9 + (stale if backlog else 0.0)
    if not link.connected and link.counters_at:
        # Nothing is known since the splitter went away: count from then.
        rpo = link.counters.get("lag_ns", 0) / 1e9 + stale
    state = disk_state(bool(link.error), link.connected,
                       shipper.state if shipper else None,
                       shipper is not None and shipper.live, c)
    return {
        "state": state,
        "error": link.error or (c.get("io_error") or None
                                if c.get("io_error_unresolved") else None),
        "io_errors": link.counters.get("io_errors", 0),
        "last_io_error": link.counters.get("io_error") or None,
        "path": d.path,
        "size": d.size,
        "format": row.settings.get("formats", {}).get(d.name, "raw"),  # formats/images.py
        "splitter_threads": splitters.threads_of(row),
        "nbd_uri": fleet.paths(d).nbd_uri,
        "generation": link.gen,
        "bytes_written": c.get("written_bytes", 0),
        "bytes_shipped": link.shipped_bytes,
        "resync_skipped_bytes": link.resync_skipped_bytes,
        "records_shipped": link.shipped_records,
        "bytes_queued": c.get("queued_bytes", 0),
        "records_queued": c.get("queued_records", 0),
        "queue_limit": c.get("queue_limit", row.queue_bytes),
        "dirty_bytes": c.get("dirty_bytes", 0),
        "dirty_ranges": c.get("dirty_ranges", 0),
        "dirty_coarsened_bytes": c.get("dirty_coarsened_bytes", 0),
        "dirty_granularity": c.get("dirty_granularity", 0),
        "resync_bytes": c.get("resync_bytes", 0),
        "last_acked_seq": link.acked[1],
        "last_acked_gen": link.acked[0],
        "next_seq": c.get("next_seq", 0),
        "rpo_seconds": round(rpo, 3),
        "device_problem": fleet.device_problems.get(d.id),  # gone, replaced, resized
        **link.resync_progress(),
    }
