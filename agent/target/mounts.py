"""File-level restore: a point of a replicated disk, its file systems mounted read-only.

``ferry mount G --disk D [--checkpoint|--at] DIR`` on site B: a view of the group at that
point (``views.py``) serves the disk over NBD; ``nbdfuse`` turns the export into a file,
``losetup --read-only --partscan`` into a block device (the kernel's ``nbd`` module would do
both; it is not everywhere), and each file system ``blkid`` finds on it (the whole device,
or each partition) is mounted read-only, ``nodev,nosuid,noexec``, without replaying its
journal (ext*: ``noload``, xfs: ``norecovery``), at ``DIR`` (one file system) or
``DIR/p1``, ``DIR/p2``... (partitions). ``ferry umount DIR`` undoes all of it in reverse.

``DIR`` must be an empty directory that is not a symbolic link, outside the agent's data
directory; a failure part-way undoes what was done and says which step failed. Mounts end
with the agent (its views do), and are listed in the group's status.
"""

from __future__ import annotations

import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from ..errors import Conflict, FerryError, Invalid, NotFound, StorageError

log = logging.getLogger("ferry.mounts")

START_TIMEOUT = 30.0
# Read-only and without replaying a journal (which would write): per file system type.
NO_REPLAY = {"ext2": "noload", "ext3": "noload", "ext4": "noload", "xfs": "norecovery"}
SAFE = "ro,nodev,nosuid,noexec"


class MountFailed(StorageError):
    """A step of mounting (nbdfuse, losetup, mount) failed: the message says which."""


@dataclass
class Mount:
    id: str
    group: str
    disk: str
    directory: str
    view: str                      # the view serving the point
    checkpoint: Optional[Dict[str, Any]]
    work: str                      # <data>/mounts/<id>: the nbdfuse mount point
    fuse: Optional[subprocess.Popen] = None
    loop: Optional[str] = None     # /dev/loopN
    mounted: List[Tuple[str, str, str]] = field(default_factory=list)  # (device, dir, type)

    def to_json(self) -> Dict[str, Any]:
        return {"id": self.id, "group": self.group, "disk": self.disk,
                "directory": self.directory, "view": self.view, "loop": self.loop,
                "checkpoint": self.checkpoint,
                "file_systems": [{"device": d, "directory": p, "type": t}
                                 for d, p, t in self.mounted]}


def check_directory(directory: str, data_dir: str) -> str:
    """``directory`` as an absolute path, if it may be mounted on (see the module)."""
    if not directory or "\0" in directory:
        raise Invalid("a mount directory is a non-empty path")
    path = os.path.abspath(directory)
    data = os.path.realpath(data_dir)
    if os.path.realpath(path) == data or os.path.realpath(path).startswith(data + os.sep):
        raise Invalid("%s is inside the agent's data directory" % path)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise NotFound("mount directory %s does not exist" % path) from None
    except OSError as e:
        raise Invalid("%s is not a directory one can mount on: %s"
                      % (path, e.strerror or e)) from None
    try:
        if os.listdir(fd):
            raise Conflict("mount directory %s is not empty" % path)
    finally:
        os.close(fd)
    if os.path.ismount(path):
        raise Conflict("%s is a mount point already" % path)
    return path


def _run(argv: List[str], what: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise MountFailed("%s: %s" % (what, e)) from None
    if out.returncode != 0:
        raise MountFailed("%s: %s" % (what, (out.stderr or out.stdout).strip().splitlines()[-1]
                                      if (out.stderr or out.stdout).strip() else
                                      "exit status %d" % out.returncode))
    return out.stdout


def file_systems(device: str) -> List[Tuple[str, str]]:
    """``(device, type)`` of each file system on ``device`` or its partitions."""
    found = []
    parts = sorted(p for p in os.listdir("/dev")
                   if p.startswith(os.path.basename(device) + "p"))
    for dev in [device] + ["/dev/" + p for p in parts]:
        out = subprocess.run(["blkid", "-o", "value", "-s", "TYPE", dev],
                             capture_output=True, text=True, timeout=30)
        fstype = out.stdout.strip()
        if out.returncode == 0 and fstype and fstype != "swap":
            found.append((dev, fstype))
    return found


class Mounts:
    def __init__(self, data_dir: str, open_view: Callable[..., Dict[str, Any]],
                 close_view: Callable[[str], Any]) -> None:
        self.data_dir = data_dir
        self.root = os.path.join(data_dir, "mounts")
        self.open_view = open_view     # (group, ref, at_wall_ns) -> the view's JSON
        self.close_view = close_view   # (view id)
        self.mounts: Dict[str, Mount] = {}

    def mount(self, group: str, disk: str, directory: str, ref: Optional[str],
              at_wall_ns: Optional[int]) -> Dict[str, Any]:
        """Mount ``disk`` of ``group`` at a point under ``directory`` (blocking)."""
        path = check_directory(directory, self.data_dir)
        if any(m.directory == path for m in self.mounts.values()):
            raise Conflict("%s is in use by another Ferry mount" % path)
        view = self.open_view(group, ref, at_wall_ns)
        if disk not in view["disks"]:
            self.close_view(view["id"])
            raise NotFound("group %s has no disk %s" % (group, disk))
        mid = uuid.uuid4().hex[:8]
        m = Mount(mid, group, disk, path, view["id"], view.get("checkpoint"),
                  os.path.join(self.root, mid))
        try:
            self._attach(m, view["disks"][disk])
        except BaseException:
            self._detach(m)
            raise
        self.mounts[mid] = m
        log.info("group %s: disk %s mounted read-only at %s (%s)", group, disk, path,
                 ", ".join("%s %s" % (t, p) for _d, p, t in m.mounted))
        return m.to_json()

    def _attach(self, m: Mount, uri: str) -> None:
        os.makedirs(m.work, mode=0o700)
        m.fuse = subprocess.Popen(["nbdfuse", "-r", m.work, uri], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, start_new_session=True)
        image = os.path.join(m.work, "nbd")
        deadline = time.monotonic() + START_TIMEOUT
        while not os.path.exists(image):
            if m.fuse.poll() is not None or time.monotonic() > deadline:
                err = m.fuse.stderr.read().decode(errors="replace").strip() \
                    if m.fuse.poll() is not None and m.fuse.stderr else "no answer"
                raise MountFailed("nbdfuse could not serve the view: %s" % (err or "exited"))
            time.sleep(0.05)
        m.loop = _run(["losetup", "--find", "--show", "--read-only", "--partscan", image],
                      "losetup").strip()
        if os.path.exists("/run/udev/control"):  # udev makes the partitions' nodes
            _run(["udevadm", "settle", "--timeout=10"], "udevadm settle")
        found = file_systems(m.loop)
        if not found:
            raise NotFound("no file system found on disk %s of group %s at this point "
                              "(blkid)" % (m.disk, m.group))
        single = len(found) == 1 and found[0][0] == m.loop
        for dev, fstype in found:
            target = m.directory if single else os.path.join(
                m.directory, "p" + dev[len(m.loop) + 1:] if dev != m.loop else "whole")
            if not single:
                os.mkdir(target, 0o755)
            opts = SAFE + ("," + NO_REPLAY[fstype] if fstype in NO_REPLAY else "")
            _run(["mount", "-t", fstype, "-o", opts, dev, target],
                 "mount %s (%s) at %s" % (dev, fstype, target))
            m.mounted.append((dev, target, fstype))

    def _detach(self, m: Mount) -> List[str]:
        """Undo what ``_attach`` did, in reverse; returns what could not be undone."""
        problems = []
        for _dev, target, _t in reversed(m.mounted):
            try:
                _run(["umount", target], "umount %s" % target)
            except MountFailed as e:
                problems.append(str(e))
                continue
            if target != m.directory:
                try:
                    os.rmdir(target)
                except OSError:
                    pass
        m.mounted = []
        if m.loop:
            try:
                _run(["losetup", "-d", m.loop], "losetup -d %s" % m.loop)
            except MountFailed as e:
                problems.append(str(e))
            m.loop = None
        if m.fuse is not None:
            subprocess.run(["umount", "-l", m.work], capture_output=True, timeout=30)
            if m.fuse.poll() is None:
                m.fuse.terminate()
                try:
                    m.fuse.wait(10)
                except subprocess.TimeoutExpired:
                    m.fuse.kill()
            m.fuse = None
        try:
            os.rmdir(m.work)
        except OSError:
            pass
        try:
            self.close_view(m.view)
        except FerryError:
            pass  # gone with its group already
        return problems

    def umount(self, directory: str) -> Dict[str, Any]:
        path = os.path.abspath(directory)
        m = next((m for m in self.mounts.values() if m.directory == path or m.id == directory),
                 None)
        if m is None:
            raise NotFound("no Ferry mount at %s" % path)
        problems = self._detach(m)
        if problems:
            raise MountFailed("%s stays mounted: %s" % (path, "; ".join(problems)))
        del self.mounts[m.id]
        log.info("group %s: disk %s unmounted from %s", m.group, m.disk, path)
        return m.to_json()

    def of_group(self, group: str) -> List[Dict[str, Any]]:
        return [m.to_json() for m in self.mounts.values() if m.group == group]

    def close_all(self) -> None:
        for mid in list(self.mounts):
            m = self.mounts.pop(mid)
            problems = self._detach(m)
            for p in problems:
                log.error("mount %s at %s: %s", mid, m.directory, p)
