"""Point-in-time views, test failovers and live failover exports on the target site: one
nbdkit per disk (``exports.py``), each living until it is closed.

A view pins its group (nothing is promoted to the replica, no segment deleted, while it is
open) and serves each disk read-only with the view plugin (``nbd_plugin/view.py``) on a Unix
socket under ``<data>/views/<id>/``. A test failover is the same with nbdkit's ``cow``
filter, whose overlay lives in that directory too: closing the test stops nbdkit and deletes
the directory, which leaves the replica and the journal as they were. A live failover's
export (``live-<group>``) serves the group's live disks (``failover.py``), writable. A view
may also write qcow2 overlays of its disks over their replicas (``overlays.py``), valid while
it is open; closing it detaches them, and is refused while one is in use.

A view's directory holds, besides the sockets, logs and pid files, ``view.json``: the view's
description, written atomically once every disk answers. The agent's stop leaves exports
running (``release``); the next agent takes back (``adopt``) each view whose every nbdkit is
still its own and answering, re-pins its group, starts again the dead disks of a live export,
and removes what is left of the others. While the agent runs, ``watch`` restarts a live
export's dead disk and reports a dead view or test (``"state": "dead"`` in status).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from formats import jindex
from formats.durable import write_atomic, write_new

from ..checkpoints import iso
from ..errors import Conflict, FerryError, NotFound
from ..plugins import VIEW as PLUGIN
from . import exports
from . import failback as fb
from . import failover as fo
from . import overlays as ov
from .exports import Export
from .group import TargetGroup

log = logging.getLogger("ferry.views")

START_TIMEOUT = exports.START_TIMEOUT
DESCRIPTION = "view.json"


@dataclass
class View:
    id: str
    group: str
    test: bool
    checkpoint: Optional[Dict[str, Any]]
    directory: str
    disks: Dict[str, str] = field(default_factory=dict)   # name -> NBD URI
    exports: Dict[str, Export] = field(default_factory=dict)
    started: float = field(default_factory=time.time)
    live: bool = False
    reported: bool = False  # its death is logged once
    overlays: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # name -> overlays.write

    def dead(self) -> List[str]:
        return sorted(d for d in self.disks
                      if d not in self.exports or not self.exports[d].alive())

    def to_json(self) -> Dict[str, Any]:
        dead = self.dead()
        return {"id": self.id, "group": self.group, "test": self.test, "live": self.live,
                "checkpoint": self.checkpoint, "disks": dict(self.disks),
                "started": self.started, "state": "dead" if dead else "serving",
                "dead_disks": dead, "overlays": {d: o["path"] for d, o in self.overlays.items()}}

    def describe(self) -> None:
        """Write ``view.json`` (atomic and durable when it returns)."""
        write_atomic(os.path.join(self.directory, DESCRIPTION), json.dumps({
            "id": self.id, "group": self.group, "test": self.test, "live": self.live,
            "checkpoint": self.checkpoint, "disks": self.disks, "started": self.started,
            "overlays": self.overlays,
        }, indent=1).encode())


class Views:
    def __init__(self, data_dir: str) -> None:
        self.root = os.path.join(os.path.abspath(data_dir), "views")
        self.views: Dict[str, View] = {}
        self._lock = threading.Lock()
        self._found = self._scan()  # an earlier agent's views, until ``adopt``

    # -- across agent restarts -----------------------------------------------------------

    def _scan(self) -> Dict[str, View]:
        """What an earlier agent left under ``views/``: each view whose description reads,
        with the exports still running (see the module)."""
        found: Dict[str, View] = {}
        if not os.path.isdir(self.root):
            return found
        for vid in sorted(os.listdir(self.root)):
            directory = os.path.join(self.root, vid)
            if os.path.exists(os.path.join(directory, fb.SPLITTERS)):
                continue  # a failback's splitters serve the live disks here (failback.py)
            try:
                with open(os.path.join(directory, DESCRIPTION)) as f:
                    d = json.load(f)
                view = View(d["id"], d["group"], bool(d["test"]), d.get("checkpoint"),
                            directory, dict(d["disks"]), started=float(d["started"]),
                            live=bool(d.get("live")), overlays=dict(d.get("overlays") or {}))
            except (OSError, ValueError, KeyError, TypeError) as e:
                log.warning("views/%s: no usable %s (%s); stopping what it left",
                            vid, DESCRIPTION, e)
                _stop_leftovers(directory)
                continue
            for disk in view.disks:
                e2 = exports.adopt(directory, disk)
                if e2 is not None:
                    view.exports[disk] = e2
            found[vid] = view
        return found

    def pins_of(self, group: str) -> int:
        """How many of an earlier agent's views of ``group`` still serve (the group opens
        pinned by them: nothing it promotes may change what they show)."""
        return sum(1 for v in self._found.values()
                   if v.group == group and not v.live and _whole(v))

    def adopt(self, groups: Dict[str, TargetGroup]) -> None:
        """Take back an earlier agent's views (their groups opened with ``pins_of``), and
        serve every failed-over group's live disks (see the module)."""
        found, self._found = self._found, {}
        for vid, view in found.items():
            group = groups.get(view.group)
            if view.live:
                if group is not None and fo.serving(group.failover):
                    try:
                        self._restart_dead(view, group)
                    except OSError as e:  # shown dead; ``watch`` tries again
                        log.error("group %s: cannot restart its live export: %s",
                                  view.group, e)
                        view.reported = True
                    self.views[vid] = view
                    log.info("group %s: live export taken back (%s)", view.group,
                             ", ".join("%s pid %d" % (d, e.pid)
                                       for d, e in sorted(view.exports.items())))
                    continue
            elif _whole(view):
                if group is not None:
                    self.views[vid] = view
                    log.info("group %s: %s %s taken back", view.group,
                             "test failover" if view.test else "view", vid)
                    continue
            log.warning("group %s: %s %s %s; removing it", view.group, _what(view), vid,
                        "is not held here" if group is None else "is no longer wanted"
                        if view.live else "lost its nbdkit")
            _stop(view)  # (a view counted by pins_of is taken back: nothing to unpin)
            _drop_overlays(view, groups.get(view.group))
        for group in groups.values():
            if fo.serving(group.failover) and "live-" + group.name not in self.views:
                try:
                    self.serve_live(group)
                except OSError as e:
                    log.error("group %s: cannot serve its live disks: %s", group.name, e)

    def release(self) -> None:
        """The agent stops: leave every export running for the next one."""
        with self._lock:
            self.views.clear()

    def watch(self, groups: Dict[str, TargetGroup]) -> None:
        """Start again a live export's dead disks; log a dead view or test once."""
        with self._lock:
            for view in list(self.views.values()):
                dead = view.dead()
                if not dead:
                    continue
                group = groups.get(view.group)
                if view.live and group is not None and fo.serving(group.failover):
                    if not view.reported:
                        log.error("group %s: the live export of %s died; starting it again",
                                  view.group, ", ".join(dead))
                    try:
                        self._restart_dead(view, group)
                        view.reported = False
                    except OSError as e:  # logged once, tried again every second
                        if not view.reported:
                            log.error("group %s: cannot restart its live export: %s",
                                      view.group, e)
                        view.reported = True
                elif not view.reported:
                    view.reported = True
                    log.error("group %s: %s %s died (nbdkit of %s gone); close it (ferry "
                              "view-close %s)", view.group, _what(view), view.id,
                              ", ".join(dead), view.id)

    def _restart_dead(self, view: View, group: TargetGroup) -> None:
        for disk in view.disks:
            e = view.exports.get(disk)
            if e is None or not e.alive():
                hung = exports.find(view.directory, disk)  # alive, but not answering
                if hung is not None:
                    hung.stop()
                view.exports[disk] = exports.start(view.directory, disk,
                                                   _live_args(group, disk))

    # -- opening and closing -------------------------------------------------------------

    def open(self, group: TargetGroup, ref: Optional[str], at_wall_ns: Optional[int],
             test: bool, overlays: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
        """Serve every disk of ``group`` at a point (blocking: run it in a thread);
        ``overlays``: {disk: new file (``restore.check_dest``)} written for it (overlays.py)."""
        if test and self.test_of(group.name) is not None:
            raise Conflict("group %s already has a test failover running; stop it first "
                           "(ferry failover %s --stop-test)" % (group.name, group.name))
        if ref is None and at_wall_ns is None and test:
            if group.failover is not None:
                fo.point(group, None, None)  # refused: says where the disks are live
            if not group.checkpoints:
                raise NotFound("group %s: the journal holds no checkpoint" % group.name)
            ref = group.checkpoints[-1].id
        checkpoint, specs = group.view_spec(ref, at_wall_ns)
        vid = uuid.uuid4().hex[:8]
        view = View(vid, group.name, test, checkpoint.to_json() if checkpoint else None,
                    os.path.join(self.root, vid))
        try:
            os.makedirs(view.directory)
            indexes = _index_open_segments(group, specs[0]["segments"], view.directory)
            for spec in specs:
                spec["indexes"] = indexes
            for st, spec in zip(group.disks, specs):
                spec_path = os.path.join(view.directory, st.name + ".json")
                write_new(spec_path, json.dumps(spec).encode())
                args = (["--filter=cow"] if test else ["--readonly"]) + \
                    ["python", PLUGIN, "spec=" + spec_path]
                # The cow filter keeps its overlay in $TMPDIR: the view's own directory.
                view.exports[st.name] = exports.start(
                    view.directory, st.name, args, dict(os.environ, TMPDIR=view.directory))
                view.disks[st.name] = "nbd+unix:///?socket=" + view.exports[st.name].sock
            for st, spec in zip(group.disks, specs):
                if overlays and st.name in overlays:
                    view.overlays[st.name] = ov.write(
                        overlays[st.name], spec, "raw",
                        os.path.join(view.directory, st.name + ".overlay.sock"),
                        "overlay of group %s disk %s to %s" % (group.name, st.name,
                                                             overlays[st.name]))
            view.describe()
        except BaseException:
            _stop(view)
            _remove_overlays(view)
            group.unpin()
            raise
        if test and checkpoint is not None:
            group.add_tag(checkpoint.id, "tested")
        with self._lock:
            self.views[vid] = view
        log.info("group %s: %s %s opened at %s", group.name, "test failover" if test else
                 "view", vid, "checkpoint %s (%s)" % (checkpoint.id, iso(checkpoint.wall_ns))
                 if checkpoint else "the newest consistent state")
        return view.to_json()

    def close(self, vid: str, groups: Dict[str, TargetGroup]) -> Dict[str, Any]:
        with self._lock:
            view = self.views.pop(vid, None)
        if view is None:
            raise NotFound("no view %s on this site" % vid)
        group = groups.get(view.group)
        if view.overlays and group is not None:
            try:
                ov.detach(view.overlays, {st.name: group.replica_path(st.name)
                                          for st in group.disks}, vid, "view %s" % vid)
            except BaseException:
                with self._lock:
                    self.views[vid] = view  # still open: its overlays stay valid
                raise
        out = view.to_json()
        _stop(view)
        if group is not None and not view.live:
            group.unpin()
        log.info("group %s: %s %s closed", view.group, _what(view), vid)
        return out

    def serve_live(self, group: TargetGroup) -> Dict[str, Any]:
        """Export a failed-over group's live disks, writable (``failover.py`` says which
        files they are)."""
        assert group.failover is not None
        vid = "live-" + group.name
        with self._lock:
            old = self.views.pop(vid, None)
        if old is not None:
            _stop(old)
        view = View(vid, group.name, False, group.failover.get("checkpoint"),
                    os.path.join(self.root, vid), live=True)
        shutil.rmtree(view.directory, ignore_errors=True)
        os.makedirs(view.directory)
        try:
            for st in group.disks:
                view.exports[st.name] = exports.start(view.directory, st.name,
                                                      _live_args(group, st.name))
                view.disks[st.name] = "nbd+unix:///?socket=" + view.exports[st.name].sock
            view.describe()
        except BaseException:
            _stop(view)
            raise
        with self._lock:
            self.views[vid] = view
        group.failover_exports(view.disks)
        return view.to_json()

    def stop_live(self, group: str) -> bool:
        """Stop a group's live export (its files stay); whether there was one."""
        with self._lock:
            view = self.views.pop("live-" + group, None)
        if view is None:
            return False
        _stop(view)
        log.warning("group %s: live export stopped", group)
        return True

    def live_of(self, group: str) -> Optional[View]:
        return self.views.get("live-" + group)

    def test_of(self, group: str) -> Optional[View]:
        return next((v for v in list(self.views.values()) if v.test and v.group == group),
                    None)

    def of_group(self, group: str) -> List[Dict[str, Any]]:
        return [v.to_json() for v in list(self.views.values()) if v.group == group]

    def close_all(self, groups: Dict[str, TargetGroup]) -> None:
        """Close every view, test and live export (their nbdkit stopped)."""
        for vid in list(self.views):
            self.close(vid, groups)


def _live_args(group: TargetGroup, disk: str) -> List[str]:
    assert group.failover is not None
    return ["file", fo.live_path(group, disk)]


def _whole(view: View) -> bool:
    return bool(view.disks) and set(view.exports) == set(view.disks)


def _what(view: View) -> str:
    return "live export" if view.live else "test failover" if view.test else "view"


def _index_open_segments(group: TargetGroup, segments: List[List[Any]], directory: str
                         ) -> Dict[str, str]:
    """Write, into the view's directory, the index of every segment of the view that has
    no index file for the size the view sees (the segment still being written): the plugin
    then reads one file per segment, never record headers. ``{segment number: path}``."""
    out = {}
    for segno, path, end in segments:
        if os.path.exists(jindex.idx_path(path)) and segno != group.journal.segments()[-1]:
            continue
        try:
            entries = group.journal.index(segno)
        except KeyError:
            continue  # gone meanwhile: the plugin reads the segment's own files
        # Appends go on while the view opens: keep the records it sees.
        n = len(entries) // jindex.ENTRY.size
        while n and jindex.ENTRY.unpack_from(entries, (n - 1) * jindex.ENTRY.size)[8] >= end:
            n -= 1
        idx = os.path.join(directory, "seg-%d.idx" % segno)
        write_new(idx, jindex.pack_idx(entries[:n * jindex.ENTRY.size], end))
        out[str(segno)] = idx
    return out


def _remove_overlays(view: View) -> None:
    """A view that failed to open: remove the overlays it wrote (if still the same files)."""
    for o in view.overlays.values():
        try:
            st = os.stat(o["path"], follow_symlinks=False)
            if (st.st_dev, st.st_ino) == (o["dev"], o["ino"]):
                os.unlink(o["path"])
        except OSError:
            pass


def _drop_overlays(view: View, group: Optional[TargetGroup]) -> None:
    """A view removed at the agent's start: its pin is gone, so detach its overlays (a
    qemu still running on one is logged: its backing replica moves on)."""
    if not view.overlays or group is None:
        return
    try:
        ov.detach(view.overlays, {st.name: group.replica_path(st.name) for st in group.disks},
                  view.id, "view %s" % view.id)
    except FerryError as e:
        log.error("group %s: %s; the replica under it is no longer pinned", view.group, e)


def _stop(view: View) -> None:
    for e in view.exports.values():
        e.stop()
    _stop_leftovers(view.directory)


def _stop_leftovers(directory: str) -> None:
    """Stop every nbdkit a view directory's pid files name (still ours, answering or
    not), and remove the directory."""
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return
    for name in names:
        if name.endswith(".pid"):
            e = exports.find(directory, name[:-len(".pid")])
            if e is not None:
                e.stop()
    shutil.rmtree(directory, ignore_errors=True)
