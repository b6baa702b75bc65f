"""Keep a Python thread state on each of nbdkit's worker threads.

nbdkit's python plugin wraps every callback in ``PyGILState_Ensure`` /
``PyGILState_Release``. On a thread Python did not create, that pair makes a new thread
state and destroys it again on every request: an allocation, the interpreter's thread
list lock twice, and on CPython 3.11 the thread's frame stack (a 16 KiB ``mmap``, page
faults, a ``munmap`` with a TLB shootdown to every CPU). Measured with ``perf`` on a
splitter under 4 KiB random writes, that was about a fifth of its CPU.

``pin()``, called at the start of a callback, makes one more ``PyGILState_Ensure`` on the
thread, never released: the thread state then outlives the callback, and every later
callback on that thread reuses it (``PyGILState_Ensure`` nests).

nbdkit ends a connection's worker threads when it closes, and their thread states would
stay behind (about 20 KiB each). So ``pin()`` remembers each state with its thread's id,
and once ``REAP_AT`` are pinned it frees those whose thread has ended (no
``/proc/self/task/TID``): ``PyThreadState_Clear`` and ``PyThreadState_Delete``, with the
GIL held, on a state no thread can use again. A thread id the kernel gave again to a new
thread keeps the old state until that one ends too. Past ``MAX_PINNED`` live pinned threads,
threads are served as before. Freeing is done on the CPython versions it was tested on
(``REAP_VERSIONS``); on others the states stay, at most ``MAX_PINNED`` of them, as before
(a long-lived splitter whose clients reconnect then falls back to the slow path). Standard
library only (ctypes).
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading
from typing import Dict

MAX_PINNED = 256  # pinned thread states at most: 16 threads a connection, 16 connections
REAP_AT = 64  # from this many pinned, a newly pinned thread first frees the ended ones
REAP_VERSIONS = ((3, 9), (3, 12))  # [from, to): CPython versions where ended ones are freed

_local = threading.local()  # lives in the thread state: empty again for a fresh one
_lock = threading.Lock()
_states: Dict[int, int] = {}  # thread state address -> its thread's native id
_reaped = 0

_api = ctypes.pythonapi
_api.PyThreadState_Get.restype = ctypes.c_void_p
_api.PyThreadState_Clear.argtypes = [ctypes.c_void_p]
_api.PyThreadState_Delete.argtypes = [ctypes.c_void_p]


def _reaps() -> bool:
    low, high = REAP_VERSIONS
    return sys.implementation.name == "cpython" and low <= sys.version_info[:2] < high


def pin() -> None:
    """Keep the calling thread's Python thread state for the thread's life (cheap when
    done already: one attribute look-up)."""
    if getattr(_local, "pinned", False):
        return
    with _lock:
        if len(_states) >= REAP_AT and _reaps():
            reap()
        if len(_states) >= MAX_PINNED:
            return
        _api.PyGILState_Ensure()
        _states[_api.PyThreadState_Get()] = threading.get_native_id()
    _local.pinned = True


def reap() -> int:
    """Free the pinned thread states whose thread has ended; how many. The caller holds
    ``_lock`` (or is the only thread) and, being Python, the GIL."""
    global _reaped
    me = threading.get_native_id()
    ended = [addr for addr, tid in _states.items()
             if tid != me and not os.path.exists("/proc/self/task/%d" % tid)]
    for addr in ended:
        del _states[addr]
        _api.PyThreadState_Clear(addr)
        _api.PyThreadState_Delete(addr)
    _reaped += len(ended)
    return len(ended)


def pinned() -> int:
    """Thread states pinned now (live threads, and ended ones not yet freed)."""
    return len(_states)


def reaped() -> int:
    """Thread states freed since the process started."""
    return _reaped
