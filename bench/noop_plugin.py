"""A Python nbdkit plugin that does nothing: the interpreter's ceiling for a splitter."""

import nbdkit

API_VERSION = 2
_size = 1024 * 1024 * 1024


def config(key, value):
    global _size
    if key != "size":
        raise RuntimeError("unknown parameter %r" % key)
    _size = int(value)


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return _size


def can_write(h):
    return True


def pread(h, buf, offset, flags):
    pass


def pwrite(h, buf, offset, flags):
    pass
