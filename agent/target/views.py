"""Point-in-time views and test failovers on the target site: one nbdkit per disk.

A view pins its group (nothing is promoted to the replica, no segment deleted, while it is
open) and runs ``nbdkit --foreground --exit-with-parent`` with the view plugin
(``nbd_plugin/view.py``) for each disk, read-only on a Unix socket under
``<data>/views/<id>/``. A test failover is the same with nbdkit's ``cow`` filter, whose
overlay lives in that directory too: closing the test stops nbdkit and deletes the
directory, which leaves the replica and the journal as they were. Views end with the agent.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from formats import jindex

from ..checkpoints import iso
from ..errors import Conflict, NotFound
from ..plugins import VIEW as PLUGIN
from ..source.splitters import nbdkit_binary
from .group import TargetGroup

log = logging.getLogger("ferry.views")

START_TIMEOUT = 60.0


@dataclass
class View:
    id: str
    group: str
    test: bool
    checkpoint: Optional[Dict[str, Any]]
    directory: str
    disks: Dict[str, str] = field(default_factory=dict)   # name -> NBD URI
    procs: List[subprocess.Popen] = field(default_factory=list)
    started: float = field(default_factory=time.time)
    live: bool = False

    def to_json(self) -> Dict[str, Any]:
        return {"id": self.id, "group": self.group, "test": self.test, "live": self.live,
                "checkpoint": self.checkpoint, "disks": dict(self.disks),
                "started": self.started}


class Views:
    def __init__(self, data_dir: str) -> None:
        self.root = os.path.join(data_dir, "views")
        self.views: Dict[str, View] = {}
        shutil.rmtree(self.root, ignore_errors=True)  # views die with the agent

    def open(self, group: TargetGroup, ref: Optional[str], at_wall_ns: Optional[int],
             test: bool) -> Dict[str, Any]:
        """Serve every disk of ``group`` at a point (blocking: run it in a thread)."""
        if test and any(v.test and v.group == group.name for v in self.views.values()):
            raise Conflict("group %s already has a test failover running; stop it first "
                               "(ferry failover %s --stop-test)" % (group.name, group.name))
        if ref is None and at_wall_ns is None and test:
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
                with open(spec_path, "w") as f:
                    json.dump(spec, f)
                sock = os.path.join(view.directory, st.name + ".sock")
                view.procs.append(_start(spec_path, sock, test, view.directory))
                view.disks[st.name] = "nbd+unix:///?socket=" + sock
            for proc, name in zip(view.procs, view.disks):
                _wait_ready(proc, os.path.join(view.directory, name + ".sock"),
                            os.path.join(view.directory, name + ".log"))
        except BaseException:
            _stop(view)
            group.unpin()
            raise
        if test and checkpoint is not None:
            group.add_tag(checkpoint.id, "tested")
        self.views[vid] = view
        log.info("group %s: %s %s opened at %s", group.name, "test failover" if test else
                 "view", vid, "checkpoint %s (%s)" % (checkpoint.id, iso(checkpoint.wall_ns))
                 if checkpoint else "the newest consistent state")
        return view.to_json()

    def close(self, vid: str, groups: Dict[str, TargetGroup]) -> Dict[str, Any]:
        view = self.views.pop(vid, None)
        if view is None:
            raise NotFound("no view %s on this site" % vid)
        _stop(view)
        group = groups.get(view.group)
        if group is not None:
            group.unpin()
        log.info("group %s: %s %s closed", view.group, "test failover" if view.test
                 else "view", vid)
        return view.to_json()

    def serve_live(self, group: TargetGroup) -> Dict[str, Any]:
        """Export a failed-over group's replicas, writable: they are the live disks now."""
        assert group.failover is not None
        vid = "live-" + group.name
        old = self.views.pop(vid, None)
        if old is not None:
            _stop(old)
        view = View(vid, group.name, False, group.failover.get("checkpoint"),
                    os.path.join(self.root, vid), live=True)
        os.makedirs(view.directory)
        try:
            for st in group.disks:
                sock = os.path.join(view.directory, st.name + ".sock")
                view.procs.append(_start_file(group.replica_path(st.name), sock))
                view.disks[st.name] = "nbd+unix:///?socket=" + sock
            for proc, name in zip(view.procs, view.disks):
                _wait_ready(proc, os.path.join(view.directory, name + ".sock"),
                            os.path.join(view.directory, name + ".log"))
        except BaseException:
            _stop(view)
            raise
        self.views[vid] = view
        return view.to_json()

    def test_of(self, group: str) -> Optional[View]:
        return next((v for v in self.views.values() if v.test and v.group == group), None)

    def of_group(self, group: str) -> List[Dict[str, Any]]:
        return [v.to_json() for v in self.views.values() if v.group == group]

    def close_all(self, groups: Dict[str, TargetGroup]) -> None:
        for vid in list(self.views):
            self.close(vid, groups)


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
        with open(idx, "wb") as f:
            f.write(jindex.pack_idx(entries[:n * jindex.ENTRY.size], end))
        out[str(segno)] = idx
    return out


def _start(spec: str, sock: str, test: bool, directory: str) -> subprocess.Popen:
    cmd = [nbdkit_binary(), "--foreground", "--exit-with-parent", "--unix", sock]
    if test:
        cmd += ["--filter=cow", "python", PLUGIN, "spec=" + spec]
    else:
        cmd += ["--readonly", "python", PLUGIN, "spec=" + spec]
    logf = open(sock[:-len(".sock")] + ".log", "ab")
    try:
        # The cow filter keeps its overlay in $TMPDIR: the view's own directory.
        return subprocess.Popen(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                env=dict(os.environ, TMPDIR=directory))
    finally:
        logf.close()


def _start_file(path: str, sock: str) -> subprocess.Popen:
    logf = open(sock[:-len(".sock")] + ".log", "ab")
    try:
        return subprocess.Popen([nbdkit_binary(), "--foreground", "--exit-with-parent",
                                 "--unix", sock, "file", path],
                                stdout=logf, stderr=logf, stdin=subprocess.DEVNULL)
    finally:
        logf.close()


def _wait_ready(proc: subprocess.Popen, sock: str, logpath: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            with open(logpath, errors="replace") as f:
                tail = " | ".join(f.read().strip().splitlines()[-3:])
            raise OSError("nbdkit for the view exited (%d): %s" % (proc.returncode, tail))
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(sock)
            return
        except OSError:
            time.sleep(0.02)
    raise OSError("nbdkit for the view did not start within %g s" % START_TIMEOUT)


def _stop(view: View) -> None:
    """SIGKILL: a view keeps no state, a test's overlay is thrown away, and a live export's
    writes are in the file already (the file plugin writes through)."""
    for proc in view.procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    shutil.rmtree(view.directory, ignore_errors=True)
