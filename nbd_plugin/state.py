"""The splitter's state file: its generation and what the target is owed across restarts.

The file is small JSON, replaced atomically (write a temporary file, fdatasync it, rename
it over the old one, fsync the directory), so it is always either the old or the new one::

    {"version": 1, "gen": 7, "clean": true, "size": 1073741824, "dirty": [[off, len], ...]}

At start the splitter reads it and at once replaces it with ``clean: false`` and the next
generation. A clean stop writes ``clean: true`` with every range the target may lack. On
the next start:

- no file: a new protection; the whole disk is owed (initial sync);
- ``clean: true`` and the same size: the saved ranges are owed;
- clean and a larger size: the saved ranges and the new tail are owed;
- another size: the whole disk is owed;
- ``clean: false`` (killed, host crash): the ranges the file carries (owed from before that
  run) and the extents in that run's activity log (see activity.py); the whole disk if
  there is no usable log or it overflowed.

Generations only grow: the next one is the saved one plus one, and never less than the
current time in seconds, so that even a lost state file cannot bring back a generation
the target has seen (which would make the target drop new records as duplicates).
"""

from __future__ import annotations

import json
import time
from typing import List, NamedTuple, Optional, Tuple

from formats.durable import write_atomic

from . import activity

VERSION = 1


class Loaded(NamedTuple):
    gen: int
    dirty: Optional[List[Tuple[int, int]]]  # None: the whole disk is owed
    reason: str
    initial: bool  # no state file: the first sync of a new protection


def load(path: str, size: int, activity_path: Optional[str] = None) -> Loaded:
    """Read the state left by the previous run and mark this run as started.

    After an unclean stop, what is owed is the ranges the previous run carried from before
    it plus the extents in its activity log (``activity_path``); without a usable log, or
    when the log overflowed, the whole disk. This run's state file carries what is owed
    until the splitter has read it all back into records (``carry_done``)."""
    # A generation is at least the time in seconds, so that a splitter whose state file
    # was lost can never reuse a generation the target already holds.
    floor = int(time.time())
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        gen, dirty, reason = floor, None, "new protection: initial sync of the whole disk"
        initial = True
    else:
        initial = False
        try:
            obj = json.loads(raw)
            gen = max(int(obj["gen"]) + 1, floor)
            clean = bool(obj["clean"])
            saved_size = int(obj["size"])
            ranges = [(int(o), int(n)) for o, n in obj["dirty"]]
        except (ValueError, KeyError, TypeError) as e:
            # A state file we cannot read costs a full resync, never a wrong replica.
            gen, dirty = floor, None
            reason = "unreadable state file (%s): full resync" % e
        else:
            if clean and saved_size < size:  # grown (ferry resize): its new tail is owed
                dirty = [*ranges, (saved_size, size - saved_size)]
                reason = "disk grew from %d to %d bytes: %d ranges and the new tail owed" % (
                    saved_size, size, len(ranges))
            elif saved_size != size:
                dirty, reason = None, "disk size changed: full resync"
            elif not clean:
                dirty, reason = _after_crash(ranges, activity_path, size)
            else:
                dirty, reason = ranges, "clean restart: %d ranges owed" % len(ranges)
    save(path, gen, size, clean=False, dirty=[(0, size)] if dirty is None else dirty)
    return Loaded(gen, dirty, reason, initial)


def carry_done(path: str, gen: int, size: int) -> None:
    """Everything owed from before this run is in records now (the activity log covers
    them): a crash from here on owes only what the activity log holds."""
    save(path, gen, size, clean=False, dirty=[])


def _after_crash(carried: List[Tuple[int, int]], activity_path: Optional[str],
                 size: int) -> Tuple[Optional[List[Tuple[int, int]]], str]:
    recorded = activity.read(activity_path) if activity_path else None
    if recorded is None:
        return None, "previous run did not stop cleanly and left no activity log: full resync"
    if recorded.overflow:
        return None, ("previous run did not stop cleanly and its activity log overflowed: "
                      "full resync")
    ranges = list(carried)
    for e in recorded.extents:
        start = e * recorded.extent_size
        if start < size:
            ranges.append((start, min(recorded.extent_size, size - start)))
    return ranges, ("previous run did not stop cleanly: resync of %d active extents of %d "
                    "bytes and %d carried ranges" % (len(recorded.extents),
                                                     recorded.extent_size, len(carried)))


def save(path: str, gen: int, size: int, clean: bool, dirty: List[Tuple[int, int]]) -> None:
    obj = {"version": VERSION, "gen": gen, "clean": clean, "size": size,
           "dirty": [list(r) for r in dirty]}
    write_atomic(path, json.dumps(obj, separators=(",", ":")).encode())
