"""A point-in-time view's qcow2 overlays (``ferry view --overlay``): a VM started on site B
from a point without copying the disk.

An overlay is a new qcow2 image whose backing file is the disk's replica and which holds
only what the journal changes over the replica up to the view's point: the pieces of the
view's map (``formats/jmap.py``) that come from journal records (each record checked, as
the view plugin checks it) or are zeroed by them (zero clusters, which read as zeroes, not
as the backing file). Everything else reads through to the replica. It is written by
``qemu-nbd`` on a private socket (``nbd_plugin/nbdclient.py``), into a ``NewFile``: made
unnamed in the destination's directory and linked to its name once complete, so a failure
leaves nothing behind and an existing name is never replaced.

The overlay is valid as long as its view is open: the view pins the group, so nothing is
promoted into the replica under it. A VM writes into its overlay, never into the replica
or the journal. Closing the view (``detach``) is refused while a process holds a lock on the
overlay (qemu locks the images it opens: a VM or a qemu-nbd running on it); otherwise the
overlay's backing file is renamed to a path that does not exist (``REPLICA.closed-view-ID``)
so that nobody can boot it against a replica that moves on (``qemu-img convert`` it first to
keep its contents).
"""

from __future__ import annotations

import errno
import os
import subprocess
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

from formats import images, jmap
from formats.durable import NewFile
from nbd_plugin.nbdclient import Connection

from ..errors import Conflict, FerryError, StorageError
from .restore import dest_error

START_TIMEOUT = 30.0
WINDOW = 256 << 20       # bytes of the disk looked up at a time
PIECE = 4 << 20          # bytes of journal data written at a time
TOOL_TIMEOUT = 120.0


def write(dest: str, spec: Dict[str, Any], backing_fmt: str, sock: str, what: str
          ) -> Dict[str, Any]:
    """Write the overlay of the disk that ``spec`` describes (a view's spec, over a replica
    of format ``backing_fmt``) to the new file ``dest`` (from ``restore.check_dest``);
    durable (data and name) when it returns. ``{"path", "dev", "ino", "bytes"}``: ``bytes``
    is what the journal put in it."""
    try:
        with NewFile(dest, 0o600) as out:
            st = os.fstat(out.fd)
            target = "/proc/self/fd/%d" % out.fd
            _run([images.tool("qemu-img"), "create", "-q", "-f", "qcow2", "-o",
                  "backing_file=%s,backing_fmt=%s" % (spec["replica"], backing_fmt),
                  target, str(spec["size"])], (out.fd,), what)
            written = _fill(target, out.fd, spec, sock, what)
            out.commit()
    except FileExistsError:
        raise Conflict("%s already exists; an overlay is a new file" % dest) from None
    except FerryError:
        raise
    except jmap.RecordCorrupt as e:
        raise StorageError("%s failed: %s; nothing was left behind" % (what, e),
                           dest, errno.EIO) from None
    except OSError as e:
        raise dest_error(what, e) from None
    return {"path": dest, "dev": st.st_dev, "ino": st.st_ino, "bytes": written}


def _fill(target: str, fd: int, spec: Dict[str, Any], sock: str, what: str) -> int:
    """Write the journal's pieces of the view into the image open as ``fd``, through a
    qemu-nbd of it on ``sock``; the bytes of journal data written."""
    reader = jmap.open_reader(spec)
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([images.tool("qemu-nbd"), "--format=qcow2", "--socket=" + sock,
                                 "--cache=writeback", "--discard=unmap", target],
                                stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                                pass_fds=(fd,))
        try:
            conn = _connect(sock, proc, err, what)
            try:
                written = _copy(reader, conn, spec["size"])
                conn.flush()
            finally:
                conn.close()
            if proc.wait(TOOL_TIMEOUT) != 0:
                raise StorageError("%s failed: qemu-nbd: %s" % (what, _last(err)), None,
                                   errno.EIO)
            return written
        finally:
            reader.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            try:
                os.unlink(sock)
            except FileNotFoundError:
                pass


def _connect(sock: str, proc: subprocess.Popen, err: Any, what: str) -> Connection:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        try:
            return Connection(sock, timeout=TOOL_TIMEOUT)
        except (FileNotFoundError, ConnectionError):
            if proc.poll() is not None:
                raise StorageError("%s failed: qemu-nbd: %s" % (what, _last(err)), None,
                                   errno.EIO) from None
            if time.monotonic() > deadline:
                raise StorageError("%s failed: qemu-nbd did not start within %g s"
                                   % (what, START_TIMEOUT), None, errno.ETIMEDOUT) from None
            time.sleep(0.02)


def _copy(reader: jmap.Reader, conn: Connection, size: int) -> int:
    written = 0
    for start in range(0, size, WINDOW):
        for s, e, src in reader.map.lookup(start, min(WINDOW, size - start)):
            if src is None:
                continue  # the replica's bytes: read through the backing file
            if src is jmap.ZERO:
                conn.zero(s, e - s, may_trim=True, fua=False)
                continue
            for off in range(s, e, PIECE):
                buf = bytearray(min(PIECE, e - off))
                reader.readinto(buf, off)  # checked against its record's checksum
                conn.pwrite(memoryview(buf), off, fua=False)
                written += len(buf)
    return written


def in_use(path: str, dev: int, ino: int) -> bool:
    """Does a process hold a lock on the file ``(dev, ino)`` (qemu locks every image it
    opens, and its backing files)? Read from ``/proc/locks``."""
    want = "%02x:%02x:%d" % (os.major(dev), os.minor(dev), ino)
    with open("/proc/locks") as f:
        for line in f:
            fields = line.split()
            if "->" in fields:
                continue  # a waiter's line repeats a lock
            if len(fields) >= 6 and fields[5] == want:
                return True
    return False


def detach(overlays: Dict[str, Dict[str, Any]], replicas: Dict[str, str], vid: str,
           what: str) -> List[str]:
    """Before view ``vid`` closes: refuse (Conflict) while any of its overlays is in use;
    then point each one still there (same file) at a backing file that does not exist.
    The overlays detached."""
    found: List[Tuple[str, int]] = []
    try:
        for disk, o in sorted(overlays.items()):
            fd = _open_same(o)
            if fd is None:
                continue  # deleted or replaced since: not ours to change
            found.append((disk, fd))
            if in_use(o["path"], o["dev"], o["ino"]):
                raise Conflict("%s: overlay %s (disk %s) is in use (a qemu has it open); "
                               "stop what runs on it first" % (what, o["path"], disk))
        done = []
        for disk, fd in found:
            _run([images.tool("qemu-img"), "rebase", "-q", "-u", "-f", "qcow2",
                  "-b", "%s.closed-view-%s" % (replicas[disk], vid), "-F", "raw",
                  "/proc/self/fd/%d" % fd], (fd,), "%s: overlay %s" % (what,
                                                                     overlays[disk]["path"]))
            os.fsync(fd)
            done.append(overlays[disk]["path"])
        return done
    finally:
        for _disk, fd in found:
            os.close(fd)


def _open_same(o: Dict[str, Any]) -> Optional[int]:
    try:
        fd = os.open(o["path"], os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (o["dev"], o["ino"]):
        os.close(fd)
        return None
    return fd


def _run(cmd: List[str], fds: Tuple[int, ...], what: str) -> None:
    try:
        done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True,
                              pass_fds=fds, timeout=TOOL_TIMEOUT)
    except subprocess.TimeoutExpired:
        raise StorageError("%s failed: %s did not end within %g s"
                           % (what, os.path.basename(cmd[0]), TOOL_TIMEOUT),
                           None, errno.ETIMEDOUT) from None
    if done.returncode != 0:
        lines = done.stderr.decode(errors="replace").strip().splitlines() or ["(no message)"]
        raise StorageError("%s failed: %s: %s" % (what, os.path.basename(cmd[0]),
                                                  "; ".join(lines)[:500]), None, errno.EIO)


def _last(err: Any) -> str:
    err.seek(0)
    lines = err.read().decode(errors="replace").strip().splitlines()
    return lines[-1] if lines else "exited"
