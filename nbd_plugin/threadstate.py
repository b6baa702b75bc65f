"""Keep a Python thread state on each of nbdkit's worker threads.

nbdkit's python plugin wraps every callback in ``PyGILState_Ensure`` /
``PyGILState_Release``. On a thread Python did not create, that pair makes a new thread
state and destroys it again on every request: an allocation, the interpreter's thread
list lock twice, and on CPython 3.11 the thread's frame stack (a 16 KiB ``mmap``, page
faults, a ``munmap`` with a TLB shootdown to every CPU). Measured with ``perf`` on a
splitter under 4 KiB random writes, that was about a fifth of its CPU.

``pin()``, called at the start of a callback, makes one more ``PyGILState_Ensure`` on the
thread, never released: the thread state then outlives the callback, and every later
callback on that thread reuses it (``PyGILState_Ensure`` nests). The cost is that a thread
state stays behind when nbdkit ends a worker thread (when its connection closes): about
20 KiB each, at most ``MAX_PINNED`` of them in the process; past that, threads are served
as before. Standard library only (ctypes), Python 3.9 and later.
"""

from __future__ import annotations

import ctypes
import threading

MAX_PINNED = 256  # thread states kept at most: 16 threads a connection, 16 connections

_local = threading.local()  # lives in the thread state: empty again for a fresh one
_pinned = 0
_lock = threading.Lock()


def pin() -> None:
    """Keep the calling thread's Python thread state for the thread's life (cheap when
    done already: one attribute look-up)."""
    global _pinned
    if getattr(_local, "pinned", False):
        return
    with _lock:
        if _pinned >= MAX_PINNED:
            return
        _pinned += 1
    ctypes.pythonapi.PyGILState_Ensure()
    _local.pinned = True


def pinned() -> int:
    return _pinned
