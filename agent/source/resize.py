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

The VM's NBD client sees its connection end and reconnects (``reconnect-delay``), as for any
splitter restart; the guest learns of the new size only when told (``virsh blockresize``).
"""

from __future__ import annotations

import logging
from typing import Any, Dict

import trio

from ..errors import Conflict, Invalid, NotFound, Unavailable
from . import status
from .splitters import SplitterError, stop

log = logging.getLogger("ferry.source")


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
