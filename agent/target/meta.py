"""``meta.json``: what a group directory on site B remembers besides its journal and replicas.

One JSON map, read here only (``load``) and written here only (``save``)::

    group        the group's name
    protection   the source's id of this protection of the group (a new one restarts it)
    history_s    the history window, seconds;  journal_max: the journal's limit, bytes
    tags         {checkpoint id: [tag, ...]}
    failover     null, or the failover record (``failover.py``): its state, the point
                 (checkpoint, cut, wall_ns), the live disks' paths and their exports
    applied      [segment, offset]: the journal position the replicas hold durably;
                 a restart re-applies the journal from there
    disks        [{name, size, applied_gen, applied_seq, ever_consistent}, ...] in group order

``save`` replaces the file atomically (``formats.durable.write_atomic``): when it returns the
new content survives a crash, and a crash before leaves the old one, never half of each. A
file that does not read back as such a map is refused with its path named (``StorageError``):
the group is then not served, and nothing replaces the file behind the admin's back.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Tuple

from formats.durable import write_atomic

from ..errors import StorageError

# What a failover record's state may be (failover.State, but for "none": no record).
FAILOVER_STATES = ("applying", "done", "committing", "committed", "rolling-back")

FILE = "meta.json"

Meta = Dict[str, Any]


def path(directory: str) -> str:
    return os.path.join(directory, FILE)


def load(directory: str) -> Optional[Meta]:
    """The group's saved metadata, or None when the directory has none yet."""
    where = path(directory)
    try:
        with open(where) as f:
            meta = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:  # ValueError: not JSON, or not UTF-8
        raise StorageError("%s: %s: %s" % (where, type(e).__name__, e), path=where,
                           errno=getattr(e, "errno", None)) from None
    problem = _problem(meta)
    if problem:
        raise StorageError("%s: %s" % (where, problem), path=where)
    return meta


def _problem(meta: Any) -> Optional[str]:
    """What is wrong with a map read back, or None."""
    if not isinstance(meta, dict):
        return "not a JSON map"
    disks = meta.get("disks", [])
    if not isinstance(disks, list):
        return "disks is not a list"
    for d in disks:
        if not isinstance(d, dict) or not isinstance(d.get("name"), str) \
                or not isinstance(d.get("size"), int):
            return "a disk entry without a name and a size: %r" % (d,)
        for key, kind in (("applied_gen", int), ("applied_seq", int),
                          ("ever_consistent", bool)):
            if not isinstance(d.get(key), kind):
                return "disk %s: no %s" % (d["name"], key)
    applied = meta.get("applied")
    if applied is not None and not (isinstance(applied, list) and len(applied) == 2
                                    and all(isinstance(x, int) for x in applied)):
        return "applied is not a journal position"
    if not isinstance(meta.get("tags", {}), dict):
        return "tags is not a map"
    failover = meta.get("failover")
    if failover is not None and not (isinstance(failover, dict)
                                     and failover.get("state") in FAILOVER_STATES
                                     and isinstance(failover.get("cut"), list)):
        return "failover is not a failover record (failover.py)"
    return None


def disks(meta: Optional[Meta]) -> List[Tuple[str, int]]:
    """(name, size) of each disk the group held, in group order."""
    return [(d["name"], d["size"]) for d in (meta or {}).get("disks", [])]


def save(directory: str, meta: Meta) -> None:
    """Replace meta.json with ``meta`` (atomic and durable when it returns; see the module)."""
    write_atomic(path(directory), json.dumps(meta, indent=1).encode())
