"""The agent's log lines, at journald's priorities.

Under systemd (``$JOURNAL_STREAM`` names stderr) each line starts with ``<N>``, the
sd-daemon(3) priority prefix journald turns into the entry's PRIORITY: ``journalctl -p
warning -u ferry-agent`` then shows alerts and failures only. Elsewhere lines carry a time
and the level's name.
"""

from __future__ import annotations

import logging
import os
import stat
import sys
from typing import List

import trio

from formats.durable import ReplaceFile, write_all

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


# The splitters' own logs (DATA/disks/<disk-id>.log, appended by nbdkit with O_APPEND) are
# rotated by copy and truncate once past ROTATE_BYTES: one old copy (.log.1) is kept.
ROTATE_BYTES = 8 << 20
ROTATE_EVERY = 60.0


def rotate(directory: str, limit: int = ROTATE_BYTES) -> List[str]:
    """Rotate every ``*.log`` in ``directory`` over ``limit`` bytes; the paths rotated.
    Lines a splitter writes between the copy and the truncation are lost (copytruncate's
    window): a few lines at most, once per ``limit`` bytes."""
    rotated: List[str] = []
    try:
        names = sorted(os.listdir(directory))
    except FileNotFoundError:
        return rotated
    for name in names:
        path = os.path.join(directory, name)
        if not name.endswith(".log"):
            continue
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_size <= limit:
                continue
            with ReplaceFile(path + ".1", 0o640) as out:
                while True:
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        break
                    write_all(out.fd, [chunk])
                out.commit()
            os.ftruncate(fd, 0)
            rotated.append(path)
        finally:
            os.close(fd)
    return rotated


async def rotate_forever(directory: str,
                         task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                         ) -> None:
    task_status.started()
    while True:
        try:
            for path in await trio.to_thread.run_sync(rotate, directory):
                logging.getLogger("ferry.logs").info("rotated %s (kept as %s.1)", path, path)
        except OSError as e:
            logging.getLogger("ferry.logs").warning("cannot rotate the splitter logs in %s: "
                                                    "%s", directory, e)
        await trio.sleep(ROTATE_EVERY)
