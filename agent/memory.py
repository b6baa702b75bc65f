"""Memory taken for a burst is given back (issue 18).

A burst (a guest writing fast, fifty status callers) makes the agent's threads allocate
batches and answers; Python frees them, but glibc keeps freed memory in its heaps (one per
thread that allocated: Trio's worker threads encode and apply batches), so the resident set
stays at the burst's peak. ``give_back`` looks at the resident set every ``PERIOD`` seconds
and, when it has grown by more than ``GROWTH`` since the last trim, asks glibc to return
what is free (``malloc_trim(0)``, every heap); measured by ``bench/control_plane.py``.
Elsewhere than glibc (musl) there is nothing to call and nothing is done.
``FERRY_MALLOC_TRIM=0`` in the agent's environment turns it off (to measure what it does).

glibc's mmap threshold is left to glibc on purpose. Fixing it at 1 MiB (so that each large
buffer, a batch being encoded, a frame received, was a mapping of its own, unmapped when
freed) made every such buffer cost a fresh mapping's page faults: an initial sync went from
207-226 MB/s to 111-126 MB/s (``bench/initial_sync.py``, side by side, 2026-12-05), while
the trim alone keeps site A within 8 MiB of idle after a burst (``bench/control_plane.py``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from typing import Any, Optional

import trio

log = logging.getLogger("ferry.memory")

PERIOD = 5.0            # seconds between looks at the resident set
GROWTH = 8 << 20        # bytes of growth since the last trim that make the next one
_libc: Any = None


def _trim_function() -> Optional[Any]:
    global _libc
    if _libc is None:
        try:
            _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        except OSError:
            _libc = False
    fn = getattr(_libc, "malloc_trim", None) if _libc else None
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def rss_bytes() -> int:
    """This process's resident set (VmRSS), bytes; 0 if /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def trim() -> bool:
    """Give free heap memory back to the system now; False where there is no malloc_trim."""
    fn = _trim_function()
    if fn is None:
        return False
    fn(0)
    return True


async def give_back(period: float = PERIOD, growth: int = GROWTH,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Trim after growth, for ever (see the module)."""
    base = rss_bytes()
    task_status.started()
    if _trim_function() is None:
        log.info("no malloc_trim here: memory is given back as the C library does")
        return
    while True:
        await trio.sleep(period)
        now = rss_bytes()
        if now > base + growth:
            await trio.to_thread.run_sync(trim)
            after = rss_bytes()
            log.debug("gave back %d KiB (resident %d -> %d KiB)", (now - after) >> 10,
                      now >> 10, after >> 10)
            base = after
        elif now < base:
            base = now
