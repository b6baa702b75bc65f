"""Failback, the old source's half: a reverse group's replicas are the site's original disks,
adopted where they lie.

When site B fails a group back (``agent/source/failback.py``), it protects its live disks to
this site under the group's own name, each disk's seed given as ``IN_PLACE``: "the disk of
the same name of the group you protected, where it lies". This site accepts that only while
its own source role of the group is fenced (site B is live: the VM here can write nothing),
and only for disks of the very sizes B sends. Then each replica is a symbolic link, made by
this site in ``<group>/replicas/``, to the original disk (no copy: failback writes onto the
disk the VM ran on), and its chunk digests are what the disk holds now. The pre-seeded sync
(``agent/seed.py``) then ships only the chunks whose digests differ: what B's VM wrote since
the failover, and what this site's VM wrote after the last point B received (A's unreplicated
writes at the fence), since every chunk is compared, whichever side changed it.

A failover of such a group (``ferry move`` back from B) writes onto the replicas, that is
onto the original disks (``failover.py``). Removing the group removes the links, never the
disks.

The return leg is the same run the other way (``ferry failback G`` on the old source, live
again): it protects its disks anew to site B with ``IN_PLACE`` seeds, and site B, which holds
G failed over and failed back, forgets G's stream (``clear``: meta.json, journal, seeds, old
replicas; never ``live/``) and adopts its live disks as G's replicas in place (``turning``).
Both sides hold the same bytes then: the digests match and nothing but new writes ships.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

from formats.durable import fsync_dir, fsync_parent

from ..seed import SeedError
from . import seeds as seed

log = logging.getLogger("ferry.target")

IN_PLACE = "@in-place"  # a seed that means: this site's own disk of that name, in place
SPLITTERS = "SPLITTERS"  # marks a live export's directory whose sockets are splitters' now

# (group name, keep) -> {disk name: path}, or SeedError: the disks of this site's fenced
# source group (keep: copy them aside first if they hold split-brain writes, splitbrain.py)
FencedDisks = Callable[[str, bool], Dict[str, str]]


def wanted(seeds: Optional[Dict[str, str]]) -> bool:
    """Whether the seeds ask for an in-place adoption (SeedError if only some do)."""
    if not seeds:
        return False
    marked = [d for d, p in seeds.items() if p == IN_PLACE]
    if marked and len(marked) != len(seeds):
        raise SeedError("seeds of disks %s are in place and the others not: a failback "
                        "adopts all of a group's disks in place" % ", ".join(sorted(marked)))
    return bool(marked)


def resolve(name: str, disks: List[Tuple[str, int]], fenced: Optional[FencedDisks],
            keep: bool = False) -> Dict[str, str]:
    """The original disk of each of ``disks`` (SeedError naming why not); ``keep``: about
    to adopt them (their split-brain writes are copied aside first)."""
    if fenced is None:
        raise SeedError("group %s: this site cannot adopt disks in place" % name)
    held = fenced(name, keep)
    out = {}
    for dname, size in disks:
        path = held.get(dname)
        if path is None:
            raise SeedError("group %s: this site's group has no disk %s to fail back onto"
                            % (name, dname))
        try:
            have = os.stat(path).st_size
            if not os.path.isfile(path):
                with open(path, "rb") as f:
                    have = f.seek(0, os.SEEK_END)
        except OSError as e:
            raise SeedError("group %s disk %s: %s: %s" % (name, dname, path,
                                                          e.strerror or e)) from None
        if have != size:
            raise SeedError("group %s disk %s: %s is %d bytes; site B's live disk is %d"
                            % (name, dname, path, have, size))
        out[dname] = os.path.realpath(path)
    return out


def adopt(directory: str, name: str, disks: List[Tuple[str, int]],
          paths: Dict[str, str]) -> None:
    """Make each replica a link to its original disk and save its digests (durable when it
    returns). The disk is only read (its all-zero chunks are not made holes)."""
    sizes = dict(disks)
    os.makedirs(os.path.join(directory, "replicas"), exist_ok=True)
    for dname, path in sorted(paths.items()):
        started = time.monotonic()
        dest = os.path.join(directory, "replicas", dname + ".img")
        tmp = dest + ".seeding"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(path, tmp)
        os.rename(tmp, dest)
        fsync_parent(dest)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            digests = seed._hash(fd, sizes[dname], seed.CHUNK, path)
        finally:
            os.close(fd)
        seed.save_digests(directory, dname, seed.SeedMap(sizes[dname], digests))
        log.warning("group %s: disk %s fails back onto %s in place (%d bytes hashed in "
                    "%.1f s)", name, dname, path, sizes[dname], time.monotonic() - started)


def turning(held_failover: Optional[Dict[str, Any]], seeds: Optional[Dict[str, str]]) -> bool:
    """Whether an OPEN with these seeds for a group held here failed over and failed back is
    the return leg: the old source, live again, protects onto this site's live disks."""
    return wanted(seeds) and bool((held_failover or {}).get("failback"))


def clear(directory: str) -> None:
    """Forget a group's stream (meta.json first, then journal, seeds and replicas); its
    live disks (``live/``) stay: they become its replicas, in place."""
    for path in (os.path.join(directory, "meta.json"),):
        if os.path.exists(path):
            os.unlink(path)
    for sub in ("journal", "seeds", "replicas"):
        shutil.rmtree(os.path.join(directory, sub), ignore_errors=True)
    fsync_dir(directory)


def forget_sockets(views_root: str, name: str) -> None:
    """Remove the directory a failback's splitters served the live disks from (they are
    stopped: the group replicates to this site again)."""
    directory = os.path.join(views_root, "live-" + name)
    if os.path.exists(os.path.join(directory, SPLITTERS)):
        shutil.rmtree(directory, ignore_errors=True)


def in_place(replica: str) -> bool:
    """Whether a replica file is an original disk adopted in place."""
    return os.path.islink(replica)
