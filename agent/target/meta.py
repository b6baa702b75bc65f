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

``rebuild`` makes the map again from what the directory still holds, for a group whose
meta.json is damaged or gone (``ferry repair G --rebuild-meta``, never on its own): the disks
are the replica files (``replicas/<disk>.img``: name and size; sorted by name, or in the
order the admin gives), the applied position is the journal's start with no disk point
(every record is applied again: harmless, see ``applier.py``), a disk is whole once
(``ever_consistent``) unless the journal shows its initial sync still running
(``KIND_APPLIED`` records with no ``consistent`` marker after them), and the protection
is unknown: ``rebuilt`` says so, and the next session of the group adopts its own instead
of starting the group anew. Tags added on this site, the limits and a failover record are
lost (the limits come back with the next session; a failover in progress is refused).

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
from formats.records import KIND_APPLIED, KIND_CONSISTENT

from ..errors import StorageError

# What a failover record's state may be (failover.State, but for "none": no record).
FAILOVER_STATES = ("applying", "done", "committing", "committed", "rolling-back")

FILE = "meta.json"
REPLICA_SUFFIX = ".img"

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
    try:
        write_atomic(path(directory), json.dumps(meta, indent=1).encode())
    except OSError as e:
        raise OSError(e.errno, e.strerror or str(e), e.filename or path(directory)) from None


def rebuild(directory: str, name: str, order: Optional[List[str]] = None,
            journal_kinds: Optional[List[Tuple[int, int]]] = None) -> Meta:
    """meta.json made again from the replicas (see the module) and saved; ``order`` names
    the disks in group order (default: by name), ``journal_kinds`` is (disk, kind) of every
    journal record in journal order. StorageError naming what is missing or wrong."""
    where = os.path.join(directory, "replicas")
    try:
        found = {f[:-len(REPLICA_SUFFIX)]: os.path.getsize(os.path.join(where, f))
                 for f in os.listdir(where) if f.endswith(REPLICA_SUFFIX)}
    except OSError as e:
        raise StorageError("cannot rebuild %s: %s: %s" % (path(directory), where,
                                                         e.strerror or e), where,
                           e.errno) from None
    if not found:
        raise StorageError("cannot rebuild %s: %s holds no replica" % (path(directory), where),
                           where)
    names = sorted(found) if order is None else list(order)
    if sorted(names) != sorted(found):
        raise StorageError("cannot rebuild %s: the disks named (%s) are not the replicas "
                           "in %s (%s)" % (path(directory), ", ".join(names), where,
                                           ", ".join(sorted(found))), where)
    syncing = [False] * len(names)
    for disk, kind in journal_kinds or []:
        if disk >= len(names):
            raise StorageError("cannot rebuild %s: the journal holds records of disk %d; "
                               "only %d replica(s) in %s" % (path(directory), disk,
                                                             len(names), where), where)
        if kind == KIND_APPLIED:
            syncing[disk] = True
        elif kind == KIND_CONSISTENT:
            syncing[disk] = False
    meta: Meta = {"group": name, "protection": None, "rebuilt": True, "tags": {},
                  "failover": None, "applied": None,
                  "disks": [{"name": n, "size": found[n], "applied_gen": 0, "applied_seq": 0,
                             "ever_consistent": not syncing[i]}
                            for i, n in enumerate(names)]}
    save(directory, meta)
    return meta
