"""One nbdkit serving one disk of a view, a test failover or a live failover on a Unix
socket, for as long as it is not stopped, whoever started it.

An export runs detached: in a new session, and forked into the background by nbdkit itself
(the way the splitters run), never ``--foreground`` under the agent. (A foreground nbdkit
sets PR_SET_PDEATHSIG, always in nbdkit 1.32 and with ``--exit-with-parent`` anyway, and
that signal fires when the *thread* that forked it exits: trio retires idle worker threads
after 10 s, so a view or a live disk stopped soon after it was opened, with nothing
logged.) So it outlives the request, the worker thread and the agent itself; only ``stop``
ends it. Its pid is written beside its socket (``<disk>.pid``, atomically with
``formats.durable.write_atomic``) once the socket answers. An agent that starts again takes
it back (``adopt``) only if ``/proc/<pid>/cmdline`` is an nbdkit serving that very socket
and the socket answers: a recycled pid is never taken, or killed, for an export.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Dict, List, Optional

from formats.durable import open_append, write_atomic

from ..source.splitters import nbdkit_binary

START_TIMEOUT = 60.0
STOP_TIMEOUT = 10.0


@dataclass
class Export:
    disk: str
    sock: str
    pid: int

    def alive(self) -> bool:
        """The nbdkit still runs (and its pid is still that nbdkit's)."""
        return is_ours(self.pid, self.sock)

    def stop(self) -> None:
        """SIGKILL and wait: views keep no state, a test's overlay is thrown away, and a
        live disk's writes are in its file already (nbdkit's file plugin writes through)."""
        if not is_ours(self.pid, self.sock):
            return  # gone, or its pid is another process's now: never kill that
        try:
            os.kill(self.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        while time.monotonic() < deadline and _running(self.pid):
            time.sleep(0.02)


def paths(directory: str, disk: str) -> Dict[str, str]:
    base = os.path.join(directory, disk)
    return {"sock": base + ".sock", "pid": base + ".pid", "log": base + ".log"}


def start(directory: str, disk: str, args: List[str],
          env: Optional[Dict[str, str]] = None) -> Export:
    """Start nbdkit with ``args`` (plugin and filters) for ``disk`` in ``directory``; return
    once its socket answers and its pid file is written. OSError (with its log's last lines)
    if it exits or does not answer within START_TIMEOUT."""
    p = paths(directory, disk)
    own = p["pid"] + ".nbdkit"  # nbdkit's own pid file, read once
    for stale in (p["sock"], p["pid"], own):
        try:
            os.unlink(stale)
        except FileNotFoundError:
            pass
    cmd = [nbdkit_binary(), "--unix", p["sock"], "--pidfile", own, "--log=stderr", *args]
    with os.fdopen(open_append(p["log"]), "ab") as logf:
        try:
            proc = subprocess.run(cmd, stdout=logf, stderr=logf, stdin=subprocess.DEVNULL,
                                  env=env, start_new_session=True, timeout=START_TIMEOUT,
                                  check=False)
        except subprocess.TimeoutExpired:
            raise OSError("nbdkit for the view did not start within %g s"
                          % START_TIMEOUT) from None
    if proc.returncode != 0:
        raise OSError("nbdkit for the view exited (%d): %s" % (proc.returncode,
                                                               _tail(p["log"])))
    export = Export(disk, p["sock"], _wait_pid(own, p["log"]))
    try:
        if not answers(p["sock"]):
            raise OSError("nbdkit for the view does not answer on %s: %s"
                          % (p["sock"], _tail(p["log"])))
        write_atomic(p["pid"], b"%d\n" % export.pid, 0o644)
        os.unlink(own)
    except BaseException:
        export.stop()
        raise
    return export


def adopt(directory: str, disk: str) -> Optional[Export]:
    """The export of ``disk`` in ``directory`` that an earlier agent started, if it still
    runs and answers on its socket; None otherwise (see the module)."""
    e = find(directory, disk)
    return e if e is not None and answers(e.sock) else None


def find(directory: str, disk: str) -> Optional[Export]:
    """The nbdkit that ``disk``'s pid file in ``directory`` names, if it still runs and
    serves that socket (answering or not); None otherwise."""
    p = paths(directory, disk)
    try:
        with open(p["pid"]) as f:
            pid = int(f.read().strip())
    except (OSError, ValueError):
        return None
    return Export(disk, p["sock"], pid) if is_ours(pid, p["sock"]) else None


def is_ours(pid: int, sock: str) -> bool:
    """Whether ``pid`` is a running nbdkit serving the Unix socket ``sock``."""
    try:
        with open("/proc/%d/cmdline" % pid, "rb") as f:
            argv = f.read().split(b"\0")
    except OSError:
        return False  # no such process (a zombie's cmdline is empty: not ours either)
    if not argv or not os.path.basename(argv[0]).startswith(b"nbdkit"):
        return False
    want = os.fsencode(sock)
    return any(a == b"--unix" and b == want for a, b in zip(argv, argv[1:]))


def answers(sock: str) -> bool:
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(5)
            s.connect(sock)
        return True
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _wait_pid(pidfile: str, logpath: str) -> int:
    """The pid nbdkit wrote (once its socket is bound, before its first process exits)."""
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        try:
            with open(pidfile) as f:
                return int(f.read().strip())
        except (OSError, ValueError):
            time.sleep(0.02)
    raise OSError("nbdkit for the view started but wrote no pid file: %s" % _tail(logpath))


def _tail(logpath: str) -> str:
    try:
        with open(logpath, errors="replace") as f:
            return " | ".join(f.read().strip().splitlines()[-3:])
    except OSError as e:
        return "(no log: %s)" % e
