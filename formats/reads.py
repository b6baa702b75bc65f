"""Reads of site B's files that say where they failed.

An ``OSError`` from ``os.pread`` on a descriptor names no file and no offset, so "Input/output
error" alone reaches the administrator. Every read of a journal segment or a replica that
can hand bytes out (views, restores, failover, verify, the scrubber) goes through ``pread``
here, or turns its error with ``failed``: the error keeps its errno and names the file (when
the caller knows it) and the byte range, in one line: ``PATH: Input/output error reading
65536 bytes at byte 1048576``. Nothing read before the error is returned.

Standard library only, Python 3.9: the view plugin runs in nbdkit's embedded Python.
"""

from __future__ import annotations

import os
from typing import Optional


def failed(e: OSError, offset: int, length: int, path: Optional[str] = None) -> OSError:
    """``e`` (a failed read of ``length`` bytes at ``offset``) naming the range and
    ``path`` (else the file ``e`` names), its errno kept."""
    return OSError(e.errno, "%s reading %d bytes at byte %d" % (e.strerror or e, length, offset),
                   path or e.filename)


def named(e: OSError, path: str) -> OSError:
    """``e`` naming ``path`` if it names no file yet (its errno and message kept)."""
    return e if e.filename else OSError(e.errno, e.strerror or str(e), path)


def pread(fd: int, length: int, offset: int, path: Optional[str] = None) -> bytes:
    """``os.pread``, its error naming ``path`` and the range (see the module)."""
    try:
        return os.pread(fd, length, offset)
    except OSError as e:
        raise failed(e, offset, length, path) from None


def one_line(e: OSError) -> str:
    """``PATH: message`` (or the message alone) for a log line or an answer."""
    msg = e.strerror or str(e)
    return "%s: %s" % (e.filename, msg) if e.filename else msg
