"""An nbdkit Python plugin for tests of nbd_plugin/threadstate.py: every pread pins its
worker thread's Python thread state, as the splitter does; a read at offset 0 answers with
``pinned=N reaped=N states=N`` (states: the interpreter's thread states, walked with the C
API), padded with spaces.

nbdkit python tests/plugins/pinning.py repo=CHECKOUT
"""

import ctypes
import sys

import nbdkit

API_VERSION = 2
SIZE = 1 << 20
threadstate = None


def config(key, value):
    global threadstate
    if key != "repo":
        raise RuntimeError("unknown parameter " + key)
    sys.path.insert(0, value)
    from nbd_plugin import threadstate as module
    threadstate = module


def thread_model():
    return nbdkit.THREAD_MODEL_PARALLEL


def open(readonly):
    return 1


def get_size(h):
    return SIZE


def _states():
    api = ctypes.pythonapi
    api.PyInterpreterState_Get.restype = ctypes.c_void_p
    api.PyInterpreterState_ThreadHead.restype = ctypes.c_void_p
    api.PyInterpreterState_ThreadHead.argtypes = [ctypes.c_void_p]
    api.PyThreadState_Next.restype = ctypes.c_void_p
    api.PyThreadState_Next.argtypes = [ctypes.c_void_p]
    n, ts = 0, api.PyInterpreterState_ThreadHead(api.PyInterpreterState_Get())
    while ts:
        n += 1
        ts = api.PyThreadState_Next(ts)
    return n


def pread(h, buf, offset, flags):
    threadstate.pin()
    buf[:] = bytes(len(buf))
    if offset == 0:
        text = ("pinned=%d reaped=%d states=%d" % (
            threadstate.pinned(), threadstate.reaped(), _states())).encode()
        buf[:64] = text.ljust(64)
