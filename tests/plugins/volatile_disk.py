"""An nbdkit Python plugin for tests: a RAM disk with a volatile write cache, and a power
switch. Writes land in the cache; a flush (or a write with FUA) makes them durable. While
the trigger file ``DIR/off`` exists the power is out: the cache is lost and every request
fails with EIO. Once it is removed, the disk serves what was durable at the cut. At the
cut, ``DIR/lost`` says how many 4 KiB blocks were written but never flushed.

nbdkit python tests/plugins/volatile_disk.py size=BYTES dir=DIR
"""

import builtins
import errno
import os

import nbdkit

API_VERSION = 2
BLOCK = 4096
_size = 0
_dir = "."
_durable = bytearray()
_cache = bytearray()    # what a reader sees while the power is on
_dirty = set()          # blocks of _cache not yet in _durable
_was_off = False


def config(key, value):
    global _size, _dir
    if key == "size":
        _size = int(value)
    elif key == "dir":
        _dir = value
    else:
        raise RuntimeError("unknown parameter %r" % key)


def get_ready():
    global _durable, _cache
    _durable = bytearray(_size)
    _cache = bytearray(_size)


def thread_model():
    return nbdkit.THREAD_MODEL_SERIALIZE_ALL_REQUESTS


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_flush(h):
    return True


def can_fua(h):
    return nbdkit.FUA_NATIVE


def _power():
    """EIO while the power is out; the cache is lost at the cut."""
    global _was_off, _cache
    if os.path.exists(os.path.join(_dir, "off")):
        if not _was_off:
            _was_off = True
            with builtins.open(os.path.join(_dir, "lost"), "w") as f:
                f.write("%d\n" % len(_dirty))  # blocks written but never flushed
            _cache = bytearray(_durable)
            _dirty.clear()
        nbdkit.set_error(errno.EIO)
        raise OSError(errno.EIO, "the power is out")
    _was_off = False


def _flush():
    for b in _dirty:
        _durable[b * BLOCK:(b + 1) * BLOCK] = _cache[b * BLOCK:(b + 1) * BLOCK]
    _dirty.clear()


def pread(h, buf, offset, flags):
    _power()
    buf[:] = _cache[offset:offset + len(buf)]


def pwrite(h, buf, offset, flags):
    _power()
    _cache[offset:offset + len(buf)] = buf
    _dirty.update(range(offset // BLOCK, (offset + len(buf) - 1) // BLOCK + 1))
    if flags & nbdkit.FLAG_FUA:
        _flush()


def flush(h, flags):
    _power()
    _flush()
