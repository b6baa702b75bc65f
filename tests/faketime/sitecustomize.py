"""Loaded (through PYTHONPATH) only into site A's agent in ``tests/test_clock_skew.py``, which
runs under libfaketime with ``FAKETIME_DONT_FAKE_MONOTONIC=1``: the wall clock is shifted,
the monotonic clock is the kernel's.

libfaketime 0.9.10 (Debian 12) fails every ``clock_nanosleep`` on ``CLOCK_MONOTONIC`` with an
absolute deadline with EINVAL in that mode, and that is what Python 3.11's ``time.sleep``
calls; ``select`` timeouts, lock and condition timeouts and epoll (trio) work. So here
``time.sleep`` waits in ``select``, by the same monotonic clock. Nothing else is changed.
"""

import os
import select
import time

if "faketime" in os.environ.get("LD_PRELOAD", ""):
    def _sleep(seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            select.select([], [], [], left)

    time.sleep = _sleep
