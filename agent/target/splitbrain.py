"""Split brain: a group failed over live on site B while site A, not told in time, took
writes too. Reported on both sites, kept, and resolved only by the administrator.

Theory of operation
-------------------
Site A sends, in every OPEN, the bytes of writes it holds that B never acked (``held``: its
splitters' queues and dirty maps). A group failed over live here that hears ``held > 0``
notes split brain in its failover record (saved, once; the count is kept up to date): A's
bytes, when B heard of them, and whether B's live disks were written since they were
served (their modification time: B does not count its VM's writes, it knows only that
there were some). Site A, refused with ``failed-over`` while it holds writes, shows the
same in its fenced status (``source/shipper.py``). Both are events. Nothing resolves it
by itself: a failback is refused until the administrator picks the survivor on site B:

- ``ferry resolve G --keep b``: B's live disks win. A's writes stay on A's disks, which are
  fenced; the failback copies those disks to A's ``<data>/kept/G/`` before it adopts them
  (``source/failback.py``), so A's changes are kept until dropped.
- ``ferry resolve G --keep a``: A's writes win (the failover must be uncommitted). B's live
  disks are copied to B's ``<data>/kept/G/`` (the live export stopped first: stop B's VM
  before), then the failover is rolled back: A's fence lifts at its next contact and what it
  holds ships. A crash during the copy finishes the rollback at the next start without it.
- ``ferry resolve G --drop-kept`` (on either site): delete that site's ``<data>/kept/G/``.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import TYPE_CHECKING, Any, Dict, Optional

import trio

from formats.durable import ReplaceFile, fsync_dir

from ..checkpoints import iso
from ..errors import Conflict, Invalid, NotFound
from . import failover as fo
from .live import lock
from .restore import sparse_copy
from .state import GroupData

if TYPE_CHECKING:
    from .server import TargetSite

log = logging.getLogger("ferry.target")

LIVE = (fo.State.DONE, fo.State.COMMITTING, fo.State.COMMITTED)


def note(g: Any, peer: str, held: int) -> Optional[Dict[str, Any]]:
    """Site A (``peer``) holds ``held`` bytes B never received while ``g`` is live here:
    the split brain record, when it is new (None when it was known)."""
    record = g.failover
    if record is None or not held or fo.state_of(record) not in LIVE:
        return None
    old = record.get("split_brain")
    if old is not None:
        if old.get("a_unreplicated_bytes") != held and not old.get("resolved"):
            g.failover_set("split_brain", dict(old, a_unreplicated_bytes=held))
        return None
    sb = {"a_unreplicated_bytes": held, "a_site": peer, "noticed": iso(time.time_ns()),
          "b_live_written": live_written(g), "resolved": None}
    g.failover_set("split_brain", sb)
    log.error("group %s: SPLIT BRAIN: it is live here and site A (%s) holds %d bytes of "
              "writes this site never received; nothing is resolved until the administrator "
              "picks (ferry resolve %s --keep a|b)", g.name, peer, held, g.name)
    return sb


def live_written(g: GroupData) -> bool:
    """Whether a live disk changed after it was first served."""
    assert g.failover is not None
    since = g.failover.get("served_ns") or g.failover["wall_ns"]
    for d in g.disks:
        try:
            if os.stat(fo.live_path(g, d.name)).st_mtime_ns > since:
                return True
        except OSError:
            continue
    return False


def unresolved(g: GroupData) -> Optional[Dict[str, Any]]:
    sb = (g.failover or {}).get("split_brain")
    return sb if sb is not None and not sb.get("resolved") else None


def kept_dir(data_dir: str, group: str) -> str:
    return os.path.join(data_dir, "kept", group)


def check_free(data_dir: str, group: str) -> None:
    """Conflict if kept copies of ``group`` are there already (one set at a time)."""
    directory = kept_dir(data_dir, group)
    if os.path.isdir(directory) and os.listdir(directory):
        raise Conflict("group %s: %s holds kept copies already: drop them first (ferry "
                       "resolve %s --drop-kept)" % (group, directory, group))


def keep(data_dir: str, group: str, disks: Dict[str, str]) -> Dict[str, str]:
    """Copy each disk (name -> path) to ``<data>/kept/<group>/<name>.img``, holes kept;
    durable when it returns. Conflict if copies are kept there already."""
    check_free(data_dir, group)
    directory = kept_dir(data_dir, group)
    os.makedirs(directory, exist_ok=True)
    out = {}
    for name, path in sorted(disks.items()):
        dest = os.path.join(directory, name + ".img")
        with ReplaceFile(dest) as copy:  # a random name O_EXCL|O_NOFOLLOW, never a link
            sparse_copy(path, copy.fd, _size(path))
            copy.commit()
        out[name] = dest
    fsync_dir(directory)
    fsync_dir(os.path.dirname(directory))
    log.warning("group %s: the losing side's disks are kept in %s until dropped (ferry "
                "resolve %s --drop-kept)", group, directory, group)
    return out


def _size(path: str) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def drop_kept(data_dir: str, group: str) -> Dict[str, Any]:
    directory = kept_dir(data_dir, group)
    if not os.path.isdir(directory):
        raise NotFound("group %s has no kept copies on this site (%s)" % (group, directory))
    names = sorted(os.listdir(directory))
    shutil.rmtree(directory)
    fsync_dir(os.path.dirname(directory))
    log.warning("group %s: kept copies dropped (%s)", group, ", ".join(names))
    return {"group": group, "dropped": names, "directory": directory}


async def resolve(site: TargetSite, name: str, survivor: str) -> Dict[str, Any]:
    """``ferry resolve G --keep a|b`` on site B (see the module)."""
    if survivor not in ("a", "b"):
        raise Invalid("--keep a (the old source's writes win) or b (this site's live disks "
                      "win), not %s" % survivor)
    g = site.group(name)
    async with lock(name):
        sb = unresolved(g) if g.failover is not None else None
        if sb is None:
            raise Conflict("group %s has no split brain to resolve here%s" % (
                name, "" if g.failover is None else
                " (it %s)" % fo.describe(g)))
        resolved = {"keep": survivor, "at": iso(time.time_ns())}
        if survivor == "b":
            g.failover_set("split_brain", dict(sb, resolved=resolved))
            log.warning("group %s: split brain resolved: site B's live disks win; site A's "
                        "writes are kept there until a failback copies them aside", name)
            return {"group": name, "keep": "b", "kept": None,
                    "split_brain": dict(sb, resolved=resolved)}
        if fo.state_of(g.failover) is not fo.State.DONE:
            raise Conflict("group %s %s: only an uncommitted failover can give way to site "
                           "A's writes (--keep b, or copy what you need by hand)"
                           % (name, fo.describe(g)))
        data_dir = os.path.dirname(site.root)
        live = {d.name: fo.live_path(g, d.name) for d in g.disks}
        check_free(data_dir, name)
        await trio.to_thread.run_sync(g.failover_rollback)
        await trio.to_thread.run_sync(site.views.stop_live, name)
        kept = await trio.to_thread.run_sync(keep, data_dir, name, live)
        await trio.to_thread.run_sync(g.failover_rolled_back)
    log.warning("group %s: split brain resolved: site A's writes win; site B's live disks "
                "are kept in %s and its failover is rolled back", name, kept_dir(data_dir, name))
    return {"group": name, "keep": "a", "kept": kept, "split_brain": dict(sb, resolved=resolved)}
