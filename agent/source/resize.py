"""``ferry resize G --disk D`` on the source site: replicate a protected disk that grew.

A disk grows under Ferry (a raw file extended, ``losetup -c`` on its loop device, an LV
extended) without the splitter knowing: an NBD export's size is fixed per connection, so
the group keeps replicating the old size (``devices.DeviceWatch`` shows the disk as grown)
until this is asked. Then:

- the disk's size is read again (as ``protect`` reads it); a smaller disk is refused with
  one line naming the disk and both sizes, and nothing changes; the same size changes
  nothing;
- the group's shipper stops, its splitters stop cleanly (it saves what site B is
  owed), the new size is stored, and both start again: the splitter owes its saved ranges
  plus the new tail (``nbd_plugin/state.py``), and the shipper's next OPEN carries the new
  size, which site B takes as growth (``target/group.py`` ``grow``: the replica is extended,
  points from before keep the old size).

qemu's NBD client does not reconnect to an export whose size changed (7.2: its requests
fail from then on) and cannot grow an NBD node (``block_resize``: "Cannot grow NBD nodes"),
so a disk whose splitter has a client connected (a running VM) is not resized: the request
is refused naming the disk, and the VM, shut down and started again, sees the new size. The
group's other splitters restart too (each keeps its size, which qemu reconnects to).
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import trio

from ..errors import Conflict, Invalid, NotFound, Unavailable
from . import status
from .splitters import SplitterError, stop

log = logging.getLogger("ferry.source")


def clients(socket: str) -> int:
    """How many connections a splitter's Unix socket has now (an accepted socket carries
    the listening one's path in /proc/net/unix, in state 03, connected)."""
    with open("/proc/net/unix") as f:  # Linux: always there
        rows = [line.rstrip("\n").split(None, 7) for line in f]
    return sum(1 for r in rows if len(r) == 8 and r[5] == "03" and r[7] == socket)


class Shrunk(Invalid):
    """A protected disk is smaller than protected: refused, nothing written."""


async def resize(site: Any, name: str, disk: str) -> Dict[str, Any]:
    """Have disk ``disk`` of group ``name`` replicated at its size now."""
    row = site.store.group(name)
    if row is None or name not in site.shippers:
        raise NotFound("no group %s on this site" % name)
    d = next((x for x in row.disks if x.name == disk), None)
    if d is None:
        raise NotFound("group %s has no disk %s" % (name, disk))
    if name in site._busy:
        raise Conflict("group %s is busy (another request changes it); try again" % name)
    size = (await trio.to_thread.run_sync(site._inspect, d.name, d.path)).virtual_size
    if size < d.size:
        raise Shrunk("disk %s/%s: %s is %d bytes now, smaller than the %d bytes protected: "
                     "shrinking is refused; nothing was changed (grow it back to at least "
                     "%d bytes)" % (name, disk, d.path, size, d.size, d.size))
    result = {"group": name, "disk": disk, "old_size": d.size, "size": size}
    if size == d.size:
        return dict(result, resized=False)
    n = await trio.to_thread.run_sync(clients, site.fleet.paths(d).socket)
    if n:
        raise Conflict("disk %s/%s: its splitter has %d client%s connected (a running VM): "
                       "qemu does not reconnect to an export whose size changed, so its I/O "
                       "would fail; shut the VM down, then resize again; until then %d bytes "
                       "are replicated" % (name, disk, n, "" if n == 1 else "s", d.size))
    site._busy.add(name)
    try:
        site._stop_group(row)
        for x in row.disks:  # all: a running splitter would stay with its old link
            await trio.to_thread.run_sync(stop, site.fleet.paths(x), x.id)
        site.store.set_disk_size(d.id, size)
        row = site.store.group(name)
        site._start_group(row)
        for x in row.disks:
            try:
                await trio.to_thread.run_sync(site.fleet.start_one, row, x)
            except (SplitterError, OSError) as e:  # the supervisor tries again
                raise Unavailable("group %s disk %s: its splitter did not start again: %s"
                                  % (name, x.name, e)) from None
    finally:
        site._busy.discard(name)
    log.warning("group %s disk %s grew from %d to %d bytes: replicated at its new size; "
                "its new tail is being synced", name, disk, d.size, size)
    return dict(result, resized=True, info=status.group_info(row, site.fleet))
