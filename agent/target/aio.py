"""Replica writes with a queue: one API, two writers.

``open_writer(fd, path)`` gives a writer of the file open at ``fd`` (``path`` names it in
errors). Both writers promise the same:

- ``pwrite(data, offset)``: every byte of ``data`` reaches the file at ``offset`` before
  ``drain`` returns; the writer may still be writing it when ``pwrite`` returns (``data``
  is copied where it is kept). Writes land in the order they were given wherever they
  overlap.
- ``punch(offset, length)``: the range reads as zeroes afterwards (``fallocate``
  PUNCH_HOLE | KEEP_SIZE), after every write given before it.
- ``drain()``: every write given has completed; the first one that failed raises an
  ``OSError`` naming the file and the byte offset (``EIO at byte 1048576``). Nothing is
  durable yet.
- ``sync()``: ``drain`` then ``fdatasync``: everything written is durable when it returns.
- Nothing is in flight once ``drain`` or ``sync`` returned (or raised): a reader of the file
  (digests, restore, views, the scrubber) then sees every byte written, through the page
  cache.

``LibaioWriter`` (when the PyPI ``libaio`` package imports, and the file opens with
``O_DIRECT``): the page-aligned part of each write goes through a second descriptor of the
same inode (``/proc/self/fd/N``, never a path) opened ``O_DIRECT``, copied into page-aligned
``mmap`` buffers and submitted with ``io_submit``, up to ``DEPTH`` at a time; an unaligned
head or tail (or a write smaller than a page) goes through the buffered descriptor with
``pwrite``. The page cache is never left stale: the kernel writes back dirty pages of a
range and drops its cached pages when an O_DIRECT write covers it, and a buffered write or a
punch is made only after every direct write in flight has completed (``drain``), as is a
direct write over a range still in flight. A short direct write is finished through the
buffered descriptor (whose error, ENOSPC or EIO, is then the one raised).

``PythonWriter``, the twin (Debian has no python3-libaio, and some file systems refuse
O_DIRECT): ``pwrite`` and ``fallocate`` through the buffered descriptor, at once.

``prefer("python" | "libaio")`` chooses for writers opened afterwards (benchmarks, tests).

``write_behind(fd, parts, start)``, for the journal's appends (which stay buffered: views
map segments, and a page both cached and written around the cache could go stale): the
parts written one after the other like ``durable.write_all``, and the writeback of every
``BEHIND`` bytes started (``sync_file_range(SYNC_FILE_RANGE_WRITE)``, whole pages) as soon as
they are in the page cache, so the disk writes the batch while the rest is copied and the
``fdatasync`` after it has less left to wait for. Durability is still that ``fdatasync``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

from formats.blockdev import FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, fallocate
from formats.durable import write_all

try:  # the optional extra ferry[aio]
    import libaio as _libaio
except (ImportError, OSError):  # not installed, or libaio.so.1 missing
    _libaio = None

ALIGN = 4096              # O_DIRECT offsets, lengths and buffers: a page (any block size)
CHUNK = 1024 * 1024       # one direct write at most
DEPTH = 8                 # direct writes in flight at most

BEHIND = 1024 * 1024       # write_behind starts the writeback of this much at a time
SYNC_FILE_RANGE_WRITE = 2

Buffer = Union[bytes, bytearray, memoryview]

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                                  ctypes.c_uint]
_libc.sync_file_range.restype = ctypes.c_int


def write_behind(fd: int, parts: Sequence[Any], start: int) -> int:
    """Write ``parts`` at the end of ``fd`` (at ``start``), starting the writeback of each
    ``BEHIND`` bytes once written (see the module); the bytes written. An error of the
    writes raises as ``write_all``'s; the writeback's own errors are the fdatasync's."""
    total = 0
    begun = start // ALIGN * ALIGN
    batch: List[Any] = []
    size = 0
    for p in parts:
        batch.append(p)
        size += len(p)
        if size >= BEHIND:
            total += write_all(fd, batch)
            batch, size = [], 0
            end = (start + total) // ALIGN * ALIGN  # never the page the next part fills
            if end > begun:
                _libc.sync_file_range(fd, begun, end - begun, SYNC_FILE_RANGE_WRITE)
                begun = end
    if batch:
        total += write_all(fd, batch)
    return total

_preferred = "libaio"


def available(name: str) -> bool:
    return name == "python" or (name == "libaio" and _libaio is not None)


def prefer(name: str) -> None:
    """Writers opened from now on are ``name``'s where it works (else the twin)."""
    global _preferred
    if name not in ("python", "libaio"):
        raise ValueError("no writer %r: python or libaio" % name)
    _preferred = name


def name() -> str:
    """The writer ``open_writer`` would try first now."""
    return "libaio" if _preferred == "libaio" and _libaio is not None else "python"


def failed(e: OSError, path: str, offset: int) -> OSError:
    """``e`` as one line naming the file and the byte offset."""
    return OSError(e.errno, "%s at byte %d" % (e.strerror or os.strerror(e.errno or 0),
                                               offset), path)


def _pwrite_all(fd: int, view: memoryview, offset: int, path: str) -> None:
    """Every byte of ``view`` at ``offset`` (short writes continued); an error names the
    file and the byte where it happened."""
    done = 0
    while done < len(view):
        try:
            n = os.pwrite(fd, view[done:], offset + done)
            if n <= 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError as e:
            raise failed(e, path, offset + done) from None
        done += n


class PythonWriter:
    """Buffered writes, made at once (see the module)."""

    kind = "python"

    def __init__(self, fd: int, path: str) -> None:
        self.fd, self.path = fd, path

    def pwrite(self, data: Buffer, offset: int) -> None:
        _pwrite_all(self.fd, memoryview(data).cast("B"), offset, self.path)

    def punch(self, offset: int, length: int) -> None:
        self.drain()
        if not length:
            return
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
        except OSError as e:
            raise failed(e, self.path, offset) from None

    def drain(self) -> None:
        pass

    def sync(self) -> None:
        self.drain()
        try:
            os.fdatasync(self.fd)
        except OSError as e:
            raise OSError(e.errno, e.strerror, self.path) from None

    def close(self) -> None:
        pass


class LibaioWriter(PythonWriter):
    """O_DIRECT through libaio, queue depth ``DEPTH`` (see the module)."""

    kind = "libaio"

    def __init__(self, fd: int, path: str) -> None:
        super().__init__(fd, path)
        assert _libaio is not None
        self.dfd = os.open("/proc/self/fd/%d" % fd,
                           os.O_WRONLY | os.O_DIRECT | os.O_CLOEXEC)
        # The context and the buffers are made at the first direct write: io_destroy
        # waits for an RCU grace period, and most small files never need them.
        self.ctx: Any = None
        self.pool: Optional[mmap.mmap] = None
        self.bufs: List[memoryview] = []
        self.free: List[int] = []
        # buffer -> (its block, offset, length) while it is in flight
        self.flight: Dict[int, Tuple[Any, int, int]] = {}
        self.error: Optional[OSError] = None

    def _start(self) -> None:
        assert _libaio is not None
        self.ctx = _libaio.AIOContext(DEPTH)
        self.pool = mmap.mmap(-1, CHUNK * DEPTH)
        self.bufs = [memoryview(self.pool)[i * CHUNK:(i + 1) * CHUNK] for i in range(DEPTH)]
        self.free = list(range(DEPTH))

    def pwrite(self, data: Buffer, offset: int) -> None:
        view = memoryview(data).cast("B")
        end = offset + len(view)
        first = -(-offset // ALIGN) * ALIGN
        last = end // ALIGN * ALIGN
        if first >= last:  # no whole page in it
            self._buffered(view, offset)
            return
        if first > offset:
            self._buffered(view[:first - offset], offset)
        pos = first
        while pos < last:
            n = min(CHUNK, last - pos)
            self._direct(view[pos - offset:pos - offset + n], pos)
            pos += n
        if end > last:
            self._buffered(view[last - offset:], last)

    def _buffered(self, view: memoryview, offset: int) -> None:
        self.drain()  # never under (or over) a direct write in flight
        super().pwrite(view, offset)

    def _direct(self, view: memoryview, offset: int) -> None:
        end = offset + len(view)
        if self.ctx is None:
            self._start()
        if any(o < end and offset < o + n for _b, o, n in self.flight.values()):
            self.drain()  # in order where they overlap
        if not self.free:
            self._reap(1)
        i = self.free.pop()
        buf = self.bufs[i][:len(view)]
        buf[:] = view
        block = _libaio.AIOBlock(_libaio.AIOBLOCK_MODE_WRITE, self.dfd, [buf], offset)
        self.flight[i] = (block, offset, len(view))
        try:
            while self.ctx.submit([block]) != 1:
                self._reap(1)  # the kernel took none (EAGAIN reported as 0): make room
        except OSError as e:
            del self.flight[i]
            self.free.append(i)
            raise failed(e, self.path, offset) from None

    def _reap(self, at_least: int) -> None:
        by_block = {id(b): i for i, (b, _o, _n) in self.flight.items()}
        for block, res, _res2 in self.ctx.getEvents(min_nr=at_least):
            i = by_block[id(block)]
            _b, offset, length = self.flight.pop(i)
            self.free.append(i)
            if res < 0:
                self.error = self.error or failed(OSError(-res, os.strerror(-res)),
                                                  self.path, offset)
            elif res < length and self.error is None:
                # A short direct write: the rest through the page cache, which says why.
                try:
                    _pwrite_all(self.fd, self.bufs[i][res:length], offset + res, self.path)
                except OSError as e:
                    self.error = e

    def drain(self) -> None:
        while self.flight:
            self._reap(len(self.flight))
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def close(self) -> None:
        """Wait for what is in flight (its errors are the caller's ``drain``), then let
        go of the context, the buffers and the O_DIRECT descriptor."""
        try:
            while self.flight:
                self._reap(len(self.flight))
        finally:
            if self.ctx is not None:
                self.ctx.close()
                self.ctx = None
            # The buffers go with their last view (a block or a traceback may hold one).
            self.bufs = []
            self.pool = None
            if self.dfd >= 0:
                os.close(self.dfd)
                self.dfd = -1


Writer = Union[PythonWriter, LibaioWriter]


def open_writer(fd: int, path: str) -> Writer:
    """The preferred writer of ``fd``; the twin where libaio or O_DIRECT is not there."""
    if name() == "libaio":
        try:
            return LibaioWriter(fd, path)
        except OSError:
            pass  # O_DIRECT refused here (EINVAL): the page cache it is
    return PythonWriter(fd, path)
