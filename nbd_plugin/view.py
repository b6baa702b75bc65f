"""Ferry's point-in-time view: an nbdkit Python plugin serving one disk of a group as it was
at a checkpoint, read-only, from the replica and the journal, nothing copied.

    nbdkit --unix SOCK python view.py spec=SPEC.json

The spec (written by the agent, ``TargetGroup.view_spec``) names the replica, the journal
segments and the disk's points; opening reads each segment's index file once (its pieces are
sorted by block on site B when the segment is closed) and builds nothing per record, so it
takes time in the number of segments, neither in the records nor in the disk. A test
failover puts nbdkit's ``cow`` filter in front, which keeps the test's writes in a private
overlay.

Thread model: parallel (reads are ``pread`` on file descriptors opened once). Standard
library only, Python 3.9 and later: nbdkit embeds the system Python. A read that needs a
journal record which fails its checksum (or lies in damage site B found) fails with EIO
and one line in the view's log (``formats/jmap.py``: what the reader vouches for); so does
a read of the replica or a segment that the disk under site B fails, with its errno and
the file and byte named.
"""

from __future__ import annotations

import builtins
import errno
import gc
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import nbdkit  # provided by nbdkit's python plugin

from formats import jmap
from formats.durable import open_append
from nbd_plugin.threadstate import pin

API_VERSION = 2

_config = {"spec": ""}
_spec: dict = {}
_reader: jmap.Reader = None  # type: ignore[assignment]
_log_path = ""


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def config(key, value):
    if key not in _config:
        raise RuntimeError("ferry view: unknown parameter %r (known: spec)" % key)
    _config[key] = value


def config_complete():
    if not _config["spec"]:
        raise RuntimeError("ferry view: spec=FILE is required")


def get_ready():
    global _reader
    with builtins.open(_config["spec"]) as f:
        _spec.update(json.load(f))
    global _log_path
    # nbdkit runs in the background (agent/target/exports.py), its stderr gone: the view's
    # messages go to the log beside its spec (<disk>.json -> <disk>.log).
    _log_path = os.path.splitext(_config["spec"])[0] + ".log"
    _reader = jmap.open_reader(_spec)
    # The map's lists are read, never changed: keep the collector from walking them.
    gc.collect()
    gc.freeze()
    nbdkit.debug("ferry view: %d pieces in %d segments"
                 % (_reader.map.pieces(), _reader.map.segments))
    if not _reader.verified:
        _log("xxhash is not importable here: journal records are not checked, only the "
             "damage site B found is refused")


def _log(msg):
    line = "%s ferry view[%d]: %s\n" % (time.strftime("%F %T"), os.getpid(), msg)
    try:
        with os.fdopen(open_append(_log_path), "a") as f:
            f.write(line)
    except OSError:
        sys.stderr.write(line)


def open(readonly):
    return 1


def get_size(h):
    return _spec["size"]


def can_write(h):
    return False


def can_multi_conn(h):
    return True


def can_cache(h):
    return nbdkit.CACHE_NONE


def pread(h, buf, offset, flags):
    pin()
    try:
        _reader.readinto(buf, offset)
    except OSError as e:
        # Never bytes B cannot vouch for or could not read: the client gets the error (EIO
        # for a record that fails its checks), the log the one line naming file and byte.
        _log(str(e))  # RecordCorrupt or ReadFailed: one line naming file and byte
        nbdkit.set_error(e.errno or errno.EIO)
        raise
