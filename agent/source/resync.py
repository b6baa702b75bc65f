"""``ferry resync G --disk D [--range ...]`` on the source site: read ranges of a disk again
and ship them, as site B's repair requests do (``target/repairs.py``). For a replica known
to be wrong somewhere (a flipped byte found by a check), or to be sure after a fault."""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from ..errors import Conflict, Invalid, NotFound


async def resync(site: Any, name: str, disk: str,
                 ranges: Optional[List[Tuple[int, int]]]) -> Dict[str, Any]:
    """Have disk ``disk`` of group ``name`` read ``ranges`` (default: all of it) again."""
    shipper = site.shippers.get(name)
    if shipper is None:
        raise NotFound("no group %s on this site" % name)
    link = next((lk for lk in shipper.links if lk.row.name == disk), None)
    if link is None:
        raise NotFound("group %s has no disk %s" % (name, disk))
    size = link.row.size
    if ranges is None:
        ranges = [(0, size)]
    if not ranges:
        raise Invalid("no ranges given")
    for offset, length in ranges:
        if offset < 0 or length <= 0 or offset + length > size:
            raise Invalid("range %d+%d is not within disk %s of group %s (%d bytes)"
                          % (offset, length, disk, name, size))
    if not await link.resync(ranges):
        raise Conflict("group %s: the splitter of disk %s is not connected%s; nothing was "
                       "asked" % (name, disk, "" if link.stream is None else
                                  " in a version that can resync ranges"))
    return {"group": name, "disk": disk, "ranges": [list(r) for r in ranges],
            "bytes": sum(n for _o, n in ranges)}
