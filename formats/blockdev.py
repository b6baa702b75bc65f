"""Calls on files and block devices that Python's ``os`` does not offer.

``fallocate`` (punch holes, zero ranges) goes through libc with ctypes; the ioctl numbers
are linux/fs.h's. Standard library only: the splitter uses these inside nbdkit.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272   # _IOR(0x12, 114, size_t)
BLKZEROOUT = 0x127F         # _IO(0x12, 127)
FICLONE = 0x40049409        # _IOW(0x94, 9, int)

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
_libc.fallocate.restype = ctypes.c_int


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Make ``[offset, +length)`` of a file read as zeroes, its blocks freed; size kept."""
    fallocate(fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
