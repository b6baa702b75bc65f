"""The agent's log lines, at journald's priorities.

Under systemd (``$JOURNAL_STREAM`` names stderr) each line starts with ``<N>``, the
sd-daemon(3) priority prefix journald turns into the entry's PRIORITY: ``journalctl -p
warning -u ferry-agent`` then shows alerts and failures only. Elsewhere lines carry a time
and the level's name.
"""

from __future__ import annotations

import logging
import os
import sys

# Python level -> syslog priority (sd-daemon.h: SD_ERR 3 ... SD_DEBUG 7).
PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6,
            logging.DEBUG: 7}


def priority(levelno: int) -> int:
    for level in sorted(PRIORITY, reverse=True):
        if levelno >= level:
            return PRIORITY[level]
    return 7


class JournalFormatter(logging.Formatter):
    """``<priority>name: message``: journald adds the time and the unit."""

    def format(self, record: logging.LogRecord) -> str:
        text = "%s: %s" % (record.name, record.getMessage())
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        prefix = "<%d>" % priority(record.levelno)
        return "\n".join(prefix + line for line in text.splitlines())


def under_journald() -> bool:
    """stderr is the journal's stream (systemd sets ``JOURNAL_STREAM=dev:inode``)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in stream.split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def setup(level: int) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journald():
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: "
                                               "%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
