"""An nbdkit Python plugin for tests: a RAM disk whose reads, writes and flushes fail with
EIO while a trigger file exists (``DIR/pread``, ``DIR/pwrite``, ``DIR/flush``). A ``pread``
trigger that holds lines ``START LENGTH`` fails only the reads that meet those byte ranges
(an empty one fails every read).

nbdkit python tests/plugins/faulty_disk.py size=BYTES dir=DIR

nbdkit's error filter (1.32) cannot fail a flush; this can. Exposed as a file through
nbdfuse, it is a disk whose device fails under site A's splitter.
"""

import builtins
import errno
import os

import nbdkit

API_VERSION = 2
_size = 0
_dir = "."
_data = bytearray()


def config(key, value):
    global _size, _dir
    if key == "size":
        _size = int(value)
    elif key == "dir":
        _dir = value
    else:
        raise RuntimeError("unknown parameter %r" % key)


def get_ready():
    global _data
    _data = bytearray(_size)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_flush(h):
    return True


def _check(op, offset=0, length=0):
    try:
        with builtins.open(os.path.join(_dir, op)) as f:
            ranges = [tuple(int(x) for x in line.split()) for line in f if line.strip()]
    except FileNotFoundError:
        return
    if ranges and not any(s < offset + length and offset < s + n for s, n in ranges):
        return
    nbdkit.set_error(errno.EIO)
    raise OSError(errno.EIO, "injected %s error" % op)


def pread(h, buf, offset, flags):
    _check("pread", offset, len(buf))
    buf[:] = _data[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _check("pwrite")
    _data[offset:offset + len(buf)] = buf


def flush(h, flags):
    _check("flush")
