"""What site B reads from a source's frames: the OPEN body and each BATCH body.

Every field is checked (type, bounds, names) before any of it is used; a body that does not
hold together raises ``frames.ProtocolError`` and the session ends with nothing touched.
The handshake and these bodies will move into the sans-IO session of
``agent/protocol/session.py``; until then they are read here, and only here.
"""

from __future__ import annotations

import re
from typing import Any, Dict, List, Optional, Tuple

from formats.records import KIND_WRITE, JRecord

from .. import checkpoints
from ..protocol import batch, frames

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


def parse_batch(body: Dict[str, Any], group: str, ndisks: int
                ) -> Tuple[List[JRecord], List[checkpoints.Checkpoint], int]:
    """A BATCH body of a session of ``group``: its records, its checkpoints (each given the
    source's wall time of its cut, by the frame's clocks) and its bytes of write data."""
    if frames.field(body, "group", str) != group:
        raise frames.ProtocolError("BATCH for group %r on a session of group %r"
                                   % (body.get("group"), group))
    records = batch.decode_batch(body)
    raw = body.get("checkpoints", [])
    if not isinstance(raw, list) or len(raw) > frames.MAX_DISKS * 16:
        raise frames.ProtocolError("bad checkpoints list")
    cps = [checkpoints.parse_wire(c, ndisks) for c in raw]
    wall_ns, mono_ns = (frames.field(body, "wall_ns", int),
                        frames.field(body, "mono_ns", int))
    for c in cps:  # the source's wall time of each cut, by this frame's clocks
        c.wall_ns = wall_ns - (mono_ns - c.time_ns)
    nbytes = sum(r.length for r in records if r.kind == KIND_WRITE)
    return records, cps, nbytes


def parse_seeds(body: dict) -> Optional[Dict[str, str]]:
    """OPEN's optional ``seeds``: {disk name: path of a seed file on this site}. Its
    presence also says that the source reads SEED frames."""
    if "seeds" not in body:
        return None
    raw = frames.field(body, "seeds", dict)
    for dname, path in raw.items():
        if not isinstance(path, str) or not 0 < len(path) <= 4096 or "\0" in path:
            raise frames.ProtocolError("bad seed path for disk %r" % (dname,))
    return dict(raw)


def parse_limits(body: dict) -> Optional[Tuple[float, int]]:
    """The group's history window and journal limit from OPEN (optional keys)."""
    if "history_s" not in body and "journal_max" not in body:
        return None
    history = frames.field(body, "history_s", int)
    limit = frames.field(body, "journal_max", int)
    if not 0 < history < 1 << 40 or not 0 < limit < 1 << 62:
        raise frames.ProtocolError("bad history_s or journal_max")
    return float(history), limit


def parse_open(body: dict) -> Tuple[str, List[Tuple[str, int]], str]:
    name = frames.name_field(body, "group")
    if not NAME_RE.match(name):
        raise frames.ProtocolError("bad group name %r" % name)
    protection = frames.field(body, "protection", str)
    disks_raw = frames.field(body, "disks", list)
    if not 1 <= len(disks_raw) <= frames.MAX_DISKS:
        raise frames.ProtocolError("a group has 1 to %d disks, not %d"
                                 % (frames.MAX_DISKS, len(disks_raw)))
    disks = []
    for d in disks_raw:
        if not isinstance(d, dict):
            raise frames.ProtocolError("disk entry is not a map")
        dname = frames.name_field(d, "name")
        if not NAME_RE.match(dname):
            raise frames.ProtocolError("bad disk name %r" % dname)
        size = frames.field(d, "size", int)
        if not 0 < size < 1 << 56:
            raise frames.ProtocolError("disk %s has a bad size %d" % (dname, size))
        disks.append((dname, size))
    if len({d[0] for d in disks}) != len(disks):
        raise frames.ProtocolError("disk names repeat")
    return name, disks, protection
