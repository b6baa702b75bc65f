"""Ferry's splitter: the nbdkit Python plugin in a protected disk's I/O path.

    nbdkit --unix SOCK python splitter.py disk=PATH agent=AGENT_SOCK state=STATE_FILE \
        disk_id=ID [queue=BYTES] [name=NAME] [group=GROUP] [log=FILE] \
        [format=raw|qcow2|vmdk qemu_socket=PATH]

The disk is served by a backend chosen by its format (backends.py): a raw file or block
device directly, a qcow2 or VMDK image through qemu-nbd on ``qemu_socket``.

Every request does the local disk first, with the client's flags, and only then records the
change for the agent (see changelog.py). Nothing about replication can fail a request: only
an error of the local disk reaches the client, with its errno.

Thread model: parallel. Overlapping writes are ordered by the change log's range lock;
reads take no lock (a read racing a write to the same blocks may see either, as on a disk).
Standard library only, Python 3.9 and later: nbdkit embeds the system Python.
"""

from __future__ import annotations

import errno
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbdkit  # provided by nbdkit's python plugin

from formats import localwire as lw
from nbd_plugin import state as statefile
from nbd_plugin.activity import DEFAULT_SLOTS, ActivityLog
from nbd_plugin.backends import Disk, open_disk
from nbd_plugin.changelog import ChangeLog
from nbd_plugin.dirtymap import DEFAULT_BUDGET, DirtyMap
from nbd_plugin.link import Link, log, set_log_file
from nbd_plugin.qemudisk import QemuDisk
from nbd_plugin.threadstate import pin

API_VERSION = 2

DEFAULT_QUEUE = 256 * 1024 * 1024

_config = {
    "disk": "", "agent": "", "state": "", "disk_id": "", "name": "", "group": "", "log": "",
    "queue": str(DEFAULT_QUEUE), "dirty_budget": str(DEFAULT_BUDGET),
    "activity_extents": str(DEFAULT_SLOTS), "format": "raw", "qemu_socket": "",
    "size": "",
}
# Set by get_ready, before nbdkit calls anything that uses them.
_disk: Disk = None  # type: ignore[assignment]
_log: ChangeLog = None  # type: ignore[assignment]
_link: Link = None  # type: ignore[assignment]


def _fail(err, msg):
    # nbdkit's own messages are gone once it runs in the background: log here too.
    log("request failed: %s (errno %d)" % (msg, err))
    nbdkit.set_error(err)
    raise OSError(err, msg)


def config(key, value):
    if key not in _config:
        raise RuntimeError("ferry splitter: unknown parameter %r (known: %s)"
                           % (key, ", ".join(sorted(_config))))
    _config[key] = value


def config_complete():
    for key in ("disk", "agent", "state", "disk_id"):
        if not _config[key]:
            raise RuntimeError("ferry splitter: %s=... is required" % key)
    for key in ("queue", "dirty_budget", "activity_extents") + (
            ("size",) if _config["size"] else ()):
        try:
            if int(_config[key]) <= 0:
                raise ValueError
        except ValueError:
            raise RuntimeError("ferry splitter: %s=%r is not a positive integer"
                               % (key, _config[key])) from None


def config_help():
    return ("disk=PATH       protected disk (raw file or block device)\n"
            "agent=SOCKET    the host agent's splitter socket\n"
            "state=FILE      the splitter's state file\n"
            "disk_id=ID      the disk's id in the agent\n"
            "log=FILE        append the splitter's messages to FILE\n"
            "queue=BYTES     bound of the in-memory change queue\n"
            "dirty_budget=BYTES  memory budget of the dirty map (default 16 MiB)\n"
            "activity_extents=N  4 MiB extents in the activity log (default 1024)\n"
            "size=BYTES      the size protected: a larger disk is served at it (until the\n"
            "                agent restarts the splitter grown), a smaller one not at all")


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def get_ready():
    global _disk, _log
    if _config["log"]:
        set_log_file(_config["log"])
    _disk = open_disk(_config["disk"], _config["format"], _config["qemu_socket"],
                      _config["log"])
    protected = int(_config["size"] or 0)
    if protected and _disk.size < protected:  # never served shrunk: nothing written
        raise RuntimeError("ferry splitter: disk %s is %d bytes, smaller than the %d bytes "
                           "protected: not served (shrinking is refused)"
                           % (_config["disk"], _disk.size, protected))
    if protected:  # grown: served at the size protected until ferry resize
        _disk.size = protected
    activity_path = _config["state"] + ".al"
    loaded = statefile.load(_config["state"], _disk.size, activity_path)
    log("disk %s (%s, %d bytes), generation %d: %s"
        % (_config["disk"], _config["format"], _disk.size, loaded.gen, loaded.reason))
    _log = ChangeLog(loaded.gen, int(_config["queue"]),
                     DirtyMap.for_budget(int(_config["dirty_budget"]), _disk.size),
                     activity=ActivityLog(activity_path,
                                          slots=int(_config["activity_extents"])))
    _log.mark_dirty([(0, _disk.size)] if loaded.dirty is None else loaded.dirty)
    _log.initial = loaded.initial


def after_fork():
    # Threads must start after nbdkit has forked into the background.
    global _link
    hello = {"disk_id": _config["disk_id"], "name": _config["name"], "group": _config["group"],
             "gen": _log.gen, "size": _disk.size, "pid": os.getpid(), "fence": 1,
             "resync": 1}
    _link = Link(_log, _disk, _config["agent"], hello)
    if isinstance(_disk, QemuDisk):  # its qemu-nbd died: what it cached may be lost
        _disk.on_lost = _owe_all
    _link.on_carry_done = lambda: statefile.carry_done(_config["state"], _log.gen, _disk.size)
    _link.start()


def _owe_all(why):
    log("%s: the whole disk is owed to the target" % why)
    _log.mark_dirty([(0, _disk.size)])


def cleanup():
    if _link is not None:
        _link.stop()
    if _log is not None and _disk is not None:
        statefile.save(_config["state"], _log.gen, _disk.size, clean=True,
                       dirty=_log.owed_ranges())
        log("clean stop: state saved")
    if _disk is not None:
        _disk.close()


def open(readonly):
    return {}


def get_size(h):
    return _disk.size


def can_write(h):
    return True


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def can_zero(h):
    return True


def can_fast_zero(h):
    return False


def can_trim(h):
    return not _disk.is_block


def can_multi_conn(h):
    # One file under all connections: a flush on any flushes every connection's writes.
    return True


def is_rotational(h):
    return False


def pread(h, buf, offset, flags):
    pin()
    try:
        _disk.pread(buf, offset)
    except OSError as e:
        _log.read_failed("read of %d bytes at %d: %s" % (len(buf), offset, e))
        _fail(e.errno or errno.EIO, "read: %s" % e)


def _check_fence():
    reason = _log.fenced
    if reason is not None:
        _fail(errno.EROFS, "writes refused: %s" % reason)


def pwrite(h, buf, offset, flags):
    pin()
    _check_fence()
    length = len(buf)
    token = _log.begin(offset, length)
    try:
        _disk.pwrite(buf, offset, fua=bool(flags & nbdkit.FLAG_FUA))
    except OSError as e:
        # The range may hold old bytes, new ones or a mix: owed, read back once it answers.
        _log.failed(token, offset, length, "write of %d bytes at %d: %s" % (length, offset, e))
        _fail(e.errno or errno.EIO, "write: %s" % e)
    # nbdkit owns buf and reuses it once we return: commit copies it if it queues the
    # change (a change that goes to the dirty map needs no copy).
    _log.commit(token, lw.KIND_WRITE, offset, length, buf,
                lw.FLAG_FUA if flags & nbdkit.FLAG_FUA else 0)


def zero(h, count, offset, flags):
    pin()
    if flags & nbdkit.FLAG_FAST_ZERO:
        _fail(errno.EOPNOTSUPP, "fast zero is not offered")
    _check_fence()
    token = _log.begin(offset, count)
    fua = bool(flags & nbdkit.FLAG_FUA)
    try:
        _disk.zero(offset, count, may_trim=bool(flags & nbdkit.FLAG_MAY_TRIM), fua=fua)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:  # refused, nothing changed
            _log.release(token)
        else:
            _log.failed(token, offset, count, "zero of %d bytes at %d: %s" % (count, offset, e))
        _fail(e.errno or errno.EIO, "zero: %s" % e)
    _log.commit(token, lw.KIND_ZERO, offset, count, None, lw.FLAG_FUA if fua else 0)


def trim(h, count, offset, flags):
    pin()
    _check_fence()
    token = _log.begin(offset, count)
    fua = bool(flags & nbdkit.FLAG_FUA)
    try:
        _disk.trim(offset, count, fua=fua)
    except OSError as e:
        if e.errno == errno.EOPNOTSUPP:  # refused, nothing changed
            _log.release(token)
        else:
            _log.failed(token, offset, count, "trim of %d bytes at %d: %s" % (count, offset, e))
        _fail(e.errno or errno.EIO, "trim: %s" % e)
    _log.commit(token, lw.KIND_TRIM, offset, count, None, lw.FLAG_FUA if fua else 0)


def flush(h, flags):
    pin()
    try:
        _disk.flush()
    except OSError as e:
        # What the device cached since the last good flush may be lost: owed, all of it.
        _log.flush_failed("flush: %s" % e)
        _fail(e.errno or errno.EIO, "flush: %s" % e)
    _log.flush()
