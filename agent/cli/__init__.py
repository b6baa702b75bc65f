"""The ``ferry`` command: runs the agent, and talks to a running agent over its API.

Exit statuses (``errors.EXIT_STATUS``): 0 done, 1 failed, 2 usage, 3 not found, 4 conflict,
5 unavailable, 6 timed out, 7 permission denied, 130 interrupted.

``app.py`` holds the click group ``cli`` and ``main``; each other module holds one family of
commands and registers them on ``cli`` when imported, as this package does below:
``daemon`` (``ferry agent``), ``groups`` (protect, set, pause, resume, unprotect, wait,
checkpoint, checkpoints), ``status``, ``pairing`` (pair-token, pair, peers, unpair),
``recovery`` (restore, view, view-close, failover), ``jobs`` (jobs, job) and ``operations``
(events, alerts, config check, dashboard-url). ``units.py`` parses and prints sizes,
durations and times.
"""

from . import (  # noqa: F401
    daemon,
    groups,
    jobs,
    mounts,
    operations,
    pairing,
    recovery,
    repair,
    status,
    verify,
)
from .app import cli, main

__all__ = ["cli", "main"]
