"""Starting and stopping the nbdkit process that serves one protected disk.

A splitter outlives the agent that started it: nbdkit forks into the background (after it
has bound its socket, so a started splitter is ready) in a session of its own, and an agent
that restarts finds it by its pid file and leaves it serving. Only ``unprotect`` (or an
administrator) stops it, with SIGTERM, which makes the plugin save what the target is owed.
nbdkit's messages from before it forks (why it could not start) and the plugin's own
messages, always, go to the disk's log file.
(Not ``nbdkit --foreground`` as the agent's child: such an nbdkit ends with its parent.)

``Fleet`` is a site's splitters, a group at a time: start them all (or none), make sure
they run (at the agent's start, and when the supervisor finds one dead), stop them.
"""

from __future__ import annotations

import dataclasses
import grp
import logging
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from formats.durable import open_append

from .. import devices
from ..errors import StorageError, Unavailable
from ..plugins import SPLITTER as PLUGIN
from ..store import DiskRow, GroupRow
from .settings import DEFAULT_SETTINGS

log = logging.getLogger("ferry.source")

SOCKET_PATH_MAX = 107
DEFAULT_THREADS = int(DEFAULT_SETTINGS["splitter_threads"])
MAX_SPLITTER_THREADS = 64


class SplitterError(Unavailable):
    """A splitter could not be started: the message says why, from nbdkit's own words."""


@dataclass(frozen=True)
class SplitterPaths:
    socket: str
    pidfile: str
    state: str
    log: str

    @classmethod
    def for_disk(cls, data_dir: str, disk_id: str) -> SplitterPaths:
        run = os.path.join(data_dir, "run")
        disks = os.path.join(data_dir, "disks")
        return cls(socket=os.path.join(run, disk_id + ".sock"),
                   pidfile=os.path.join(run, disk_id + ".pid"),
                   state=os.path.join(disks, disk_id + ".state.json"),
                   log=os.path.join(disks, disk_id + ".log"))

    @property
    def qemu_socket(self) -> str:
        """The private socket of the qemu-nbd behind a qcow2 or VMDK disk's splitter."""
        return self.socket[:-len(".sock")] + ".qemu.sock"

    @property
    def nbd_uri(self) -> str:
        return "nbd+unix:///?socket=" + self.socket


START_TIMEOUT = 60.0    # nbdkit binds its socket and forks into the background within this
PIDFILE_TIMEOUT = 10.0  # then its pid file shows up within this


def nbdkit_binary() -> str:
    path = shutil.which("nbdkit")
    if path is None:
        raise SplitterError("nbdkit is not installed (Debian: apt-get install nbdkit "
                            "nbdkit-plugin-python)")
    return path


def running_pid(paths: SplitterPaths, disk_id: str) -> Optional[int]:
    """The pid of this disk's nbdkit if it runs, else None (a stale pid file is ignored)."""
    try:
        with open(paths.pidfile) as f:
            pid = int(f.read().strip())
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            cmdline = f.read().split(b"\0")
    except (OSError, ValueError):
        return None
    if ("disk_id=%s" % disk_id).encode() not in cmdline:
        return None
    return pid


def threads_of(row: GroupRow) -> int:
    """How many requests each of the group's splitters serves at once (``protect
    --splitter-threads``). Concurrency hides a slow disk's latency but costs CPU in the
    interpreter's lock on fast storage: bench/splitter_threads.py measures both."""
    return int(dict(DEFAULT_SETTINGS, **row.settings)["splitter_threads"])


def start(paths: SplitterPaths, disk_id: str, disk_path: str, agent_socket: str,
          group: str, name: str, queue_bytes: int, threads: int = DEFAULT_THREADS,
          fmt: str = "raw", size: int = 0) -> int:
    """Start nbdkit for a disk unless it already runs; return its pid once it serves
    (``size``: the size protected, which it serves even on a disk grown since)."""
    pid = running_pid(paths, disk_id)
    if pid is not None:
        return pid
    for sock in (paths.socket, paths.qemu_socket):
        if len(sock) > SOCKET_PATH_MAX:
            raise SplitterError("socket path %s is longer than %d bytes: use a shorter --data "
                                "directory" % (sock, SOCKET_PATH_MAX))
    for directory in {os.path.dirname(p) for p in (paths.socket, paths.pidfile, paths.state)}:
        os.makedirs(directory, exist_ok=True)  # the socket may lie elsewhere (a failback)
    for stale in (paths.socket, paths.pidfile):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    cmd = [nbdkit_binary(), "--unix", paths.socket, "--pidfile", paths.pidfile,
           "--log=stderr", "--threads", str(threads),
           "python", PLUGIN, "disk=" + disk_path, "agent=" + agent_socket,
           "state=" + paths.state, "log=" + paths.log, "disk_id=" + disk_id,
           "group=" + group, "name=" + name,
           "queue=%d" % queue_bytes]
    if size:
        cmd.append("size=%d" % size)
    if fmt != "raw":  # pinned at protect: qemu-nbd behind the splitter (nbd_plugin/backends.py)
        cmd += ["format=" + fmt, "qemu_socket=" + paths.qemu_socket]
    with os.fdopen(open_append(paths.log), "ab") as logf:
        logf.write(("--- %s starting: %s\n" % (time.strftime("%F %T"), " ".join(cmd))).encode())
        logf.flush()
        # nbdkit forks into the background once its socket is bound, and the parent exits:
        # the agent is never the splitter's parent, so nothing the agent suffers reaches it.
        try:
            proc = subprocess.run(cmd, stdin=subprocess.DEVNULL, stdout=logf, stderr=logf,
                                  start_new_session=True, timeout=START_TIMEOUT, check=False)
        except subprocess.TimeoutExpired:
            raise SplitterError("nbdkit for %s did not start within %g s; see %s"
                                % (disk_path, START_TIMEOUT, paths.log)) from None
    if proc.returncode != 0:
        raise SplitterError("nbdkit for %s failed to start (exit %d): %s"
                            % (disk_path, proc.returncode, _tail(paths.log)))
    deadline = time.monotonic() + PIDFILE_TIMEOUT
    while time.monotonic() < deadline:
        pid = running_pid(paths, disk_id)
        if pid is not None:
            return pid
        time.sleep(0.02)
    raise SplitterError("nbdkit for %s started but wrote no pid file; see %s"
                        % (disk_path, paths.log))


def stop(paths: SplitterPaths, disk_id: str, timeout: float = 30) -> bool:
    """Stop the disk's nbdkit cleanly (it saves its state); True if one was running."""
    pid = running_pid(paths, disk_id)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not os.path.exists("/proc/%d" % pid) or _is_zombie(pid):
            return True
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return True


def _is_zombie(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _tail(path: str, lines: int = 5) -> str:
    try:
        with open(path, errors="replace") as f:
            return " | ".join(line.strip() for line in f.readlines()[-lines:])
    except OSError:
        return "(no log)"


def share_socket(socket: str, group: str) -> None:
    """Let ``group`` connect to a splitter's socket: the socket 0660 and its directory
    0710 (traverse, not list), both of that group."""
    try:
        gid = grp.getgrnam(group).gr_gid
    except KeyError:
        raise SplitterError("no group %s to share splitter sockets with" % group) from None
    for path, mode in ((os.path.dirname(socket), 0o710), (socket, 0o660)):
        os.chown(path, -1, gid)
        os.chmod(path, mode)


def remove_files(paths: SplitterPaths) -> None:
    """Every file a stopped splitter made: its socket, pid file, state file, the plugin's
    activity log beside it (``STATE.al``), and its log with its rotated copy."""
    for p in (paths.state, paths.state + ".al", paths.socket, paths.pidfile, paths.log,
              paths.log + ".1", paths.qemu_socket):
        try:
            os.unlink(p)
        except FileNotFoundError:
            pass


class Fleet:
    """The splitters of a site's groups (blocking calls: run them in a thread)."""

    def __init__(self, data_dir: str, agent_socket: str) -> None:
        self.data_dir = data_dir
        self.agent_socket = agent_socket
        self.socket_group: Optional[str] = None  # may connect too (qemu's: libvirt-qemu)
        self.sockets: Dict[str, str] = {}  # disk id -> its socket, where not the default
        self.device_problems: Dict[str, str] = {}  # disk id: cause (devices.DeviceWatch)

    def paths(self, disk: DiskRow) -> SplitterPaths:
        paths = SplitterPaths.for_disk(self.data_dir, disk.id)
        socket = self.sockets.get(disk.id)
        return paths if socket is None else dataclasses.replace(paths, socket=socket)

    def start_one(self, row: GroupRow, d: DiskRow) -> None:
        """Start one disk's splitter unless it runs (SplitterError, OSError)."""
        self._start(row, d)

    def _start(self, row: GroupRow, d: DiskRow) -> SplitterPaths:
        paths = self.paths(d)
        try:  # the block device recorded, or none (agent/devices.py)
            devices.verify(self.data_dir, d.id, d.name, d.path)
        except (devices.DeviceChanged, StorageError) as e:
            raise SplitterError(str(e)) from None
        except OSError as e:  # gone, or not reachable: the splitter could not open it either
            raise SplitterError("disk %s: %s: %s" % (d.name, d.path, e.strerror or e)) from None
        start(paths, d.id, d.path, self.agent_socket, row.name, d.name, row.queue_bytes,
              threads=threads_of(row),
              fmt=row.settings.get("formats", {}).get(d.name, "raw"), size=d.size)
        if self.socket_group is not None:
            share_socket(paths.socket, self.socket_group)
        return paths

    def start_all(self, row: GroupRow) -> None:
        """Start every splitter of a new group, or none (SplitterError, OSError)."""
        tried = 0
        try:
            for d in row.disks:
                tried += 1
                self._start(row, d)
        except (SplitterError, OSError):
            for d in row.disks[:tried]:  # the one that failed left its files too
                stop(self.paths(d), d.id)
                remove_files(self.paths(d))
                devices.forget(self.data_dir, d.id)
            raise

    def ensure(self, row: GroupRow) -> None:
        """Start those of a group's splitters that do not run; log those that cannot."""
        for d in row.disks:
            try:
                self._start(row, d)
            except (SplitterError, OSError) as e:
                log.error("group %s disk %s: splitter not running: %s", row.name, d.name, e)

    def dead(self, row: GroupRow) -> List[DiskRow]:
        """The group's disks whose splitter does not run."""
        return [d for d in row.disks if running_pid(self.paths(d), d.id) is None]

    def stop_all(self, row: GroupRow) -> None:
        """Stop a group's splitters (each saves its state) and remove their files."""
        for d in row.disks:
            paths = self.paths(d)
            stop(paths, d.id)
            remove_files(paths)
            devices.forget(self.data_dir, d.id)
