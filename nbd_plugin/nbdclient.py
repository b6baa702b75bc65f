"""A small blocking NBD client: enough to reach qemu-nbd on a Unix socket.

Standard library only (the splitter runs in nbdkit's embedded Python, where libnbd's binding
may be missing). Fixed newstyle handshake, ``NBD_OPT_GO`` for the default export, simple
replies only (structured replies are never asked for), one request at a time per
connection: a caller that wants parallel I/O opens several (``Pool``).

Every request either completes or raises ``OSError``: the server's error as its errno (NBD's
error numbers are Linux's), or ``ConnectionError`` (EPIPE/ECONNRESET) when the connection broke,
after which the connection is unusable. Large requests are split into pieces of at most
``MAX_REQUEST`` bytes (qemu-nbd refuses more than 32 MiB).

``NativeConnection`` is the same interface over libnbd's Python binding (C code that lets go
of the GIL for the whole request: about a third less CPU per 4 KiB write than ``Connection``
under concurrency, measured with qemu-nbd), used by ``connect`` where ``nbd`` imports and
``FERRY_NBD_CLIENT`` is not ``python``; ``Connection`` is its pure-Python twin.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from typing import Any, Callable, List, Optional

NBDMAGIC = 0x4E42444D41474943
IHAVEOPT = 0x49484156454F5054
OPT_REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE, FLAG_NO_ZEROES = 1, 2
OPT_GO, REP_ACK, REP_INFO, INFO_EXPORT = 7, 1, 3, 0
REP_ERROR_BIT = 1 << 31
TF_SEND_FLUSH, TF_SEND_FUA, TF_SEND_WRITE_ZEROES = 4, 8, 64
NEEDED = TF_SEND_FLUSH | TF_SEND_FUA | TF_SEND_WRITE_ZEROES  # qemu-nbd offers them all
CMD_READ, CMD_WRITE, CMD_DISC, CMD_FLUSH, CMD_WRITE_ZEROES = 0, 1, 2, 3, 6
CMD_FLAG_FUA, CMD_FLAG_NO_HOLE = 1, 2

MAX_REQUEST = 32 * 1024 * 1024
MAX_ZERO = 1 << 30
_REQUEST = struct.Struct(">IHHQQI")   # magic, flags, type, handle, offset, length (28 bytes)
_REPLY = struct.Struct(">IIQ")        # magic, error, handle (16 bytes)
_OPT_REPLY = struct.Struct(">QIII")   # magic, option, type, length (20 bytes)
assert _REQUEST.size == 28 and _REPLY.size == 16 and _OPT_REPLY.size == 20


class ProtocolError(ConnectionError):
    """The server broke the protocol (or is not an NBD server): the connection is dropped."""


class Connection:
    """One NBD connection to the default export of a Unix socket."""

    def __init__(self, path: str, timeout: Optional[float] = None) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        self._handle = 0
        try:
            self.sock.connect(path)
            self.size, self.flags = self._handshake()
        except BaseException:
            self.sock.close()
            raise

    def close(self) -> None:
        try:
            self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        except OSError:
            pass
        self.sock.close()

    def drop(self) -> None:
        """Close the socket without a word to the server (a connection left half-way)."""
        self.sock.close()

    def _recv(self, n: int) -> bytes:
        buf = bytearray(n)
        self._recv_into(memoryview(buf))
        return bytes(buf)

    def _recv_into(self, view: memoryview) -> None:
        while view:
            got = self.sock.recv_into(view)
            if got == 0:
                raise ConnectionResetError(errno.ECONNRESET, "NBD server closed the connection")
            view = view[got:]

    def _handshake(self) -> tuple:
        magic, opt, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt != IHAVEOPT or not hflags & FLAG_FIXED_NEWSTYLE:
            raise ProtocolError("not a fixed-newstyle NBD server")
        cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)
        self.sock.sendall(struct.pack(">I", cflags))
        data = struct.pack(">IH", 0, 0)   # export name "" and no info requests
        self.sock.sendall(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)) + data)
        size = flags = None
        while True:
            magic, option, rtype, length = _OPT_REPLY.unpack(self._recv(_OPT_REPLY.size))
            if magic != OPT_REPLY_MAGIC or option != OPT_GO or length > 65536:
                raise ProtocolError("bad NBD option reply")
            payload = self._recv(length)
            if rtype & REP_ERROR_BIT:
                raise ProtocolError("NBD server refused the export: %s"
                                    % payload.decode(errors="replace"))
            if rtype == REP_INFO and len(payload) >= 12 and payload[:2] == b"\0\0":
                size, flags = struct.unpack(">QH", payload[2:12])
            elif rtype == REP_ACK:
                break
        if size is None or flags is None:
            raise ProtocolError("NBD server sent no export size")
        if flags & NEEDED != NEEDED:
            raise ProtocolError("NBD server does not offer flush, FUA and write zeroes "
                                "(transmission flags 0x%x)" % flags)
        return size, flags

    def _request(self, cmd: int, flags: int, offset: int, length: int,
                 data: Optional[memoryview] = None, into: Optional[memoryview] = None) -> None:
        self._handle += 1
        self.sock.sendall(_REQUEST.pack(REQUEST_MAGIC, flags, cmd, self._handle, offset,
                                        length))
        if data is not None:
            self.sock.sendall(data)
        magic, error, handle = _REPLY.unpack(self._recv(_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC or handle != self._handle:
            raise ProtocolError("bad NBD reply")
        if error:
            raise OSError(error, "NBD server: %s" % os.strerror(error))
        if into is not None:
            self._recv_into(into)

    def pread(self, buf: memoryview, offset: int) -> None:
        for piece, off in _pieces(len(buf), offset, MAX_REQUEST):
            self._request(CMD_READ, 0, off, piece, into=buf[off - offset:off - offset + piece])

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        flags = CMD_FLAG_FUA if fua else 0
        for piece, off in _pieces(len(buf), offset, MAX_REQUEST):
            self._request(CMD_WRITE, flags, off, piece,
                          data=buf[off - offset:off - offset + piece])

    def flush(self) -> None:
        self._request(CMD_FLUSH, 0, 0, 0)

    def zero(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        flags = (0 if may_trim else CMD_FLAG_NO_HOLE) | (CMD_FLAG_FUA if fua else 0)
        for piece, off in _pieces(length, offset, MAX_ZERO):
            self._request(CMD_WRITE_ZEROES, flags, off, piece)


class NativeConnection:
    """``Connection`` over libnbd (see the module): one handle, one request at a time."""

    def __init__(self, path: str) -> None:
        assert _nbd is not None
        self._h = _nbd.NBD()
        try:
            self._h.connect_unix(path)
            self.size = self._h.get_size()
            if not (self._h.can_flush() and self._h.can_fua() and self._h.can_zero()):
                raise ProtocolError("NBD server does not offer flush, FUA and write zeroes")
        except _nbd.Error as e:
            self._h = None
            raise _os_error(e, "cannot connect to %s" % path) from None
        except BaseException:
            self._h = None
            raise
        self.flags = NEEDED

    def close(self) -> None:
        h, self._h = self._h, None
        if h is not None:
            try:
                h.shutdown()
            except _nbd.Error:
                pass

    def drop(self) -> None:
        """End the connection now, whatever it was doing (a connection left half-way)."""
        h, self._h = self._h, None
        if h is not None:
            try:  # not left to the collector: a traceback may hold the handle a long time
                h.shutdown(_nbd.SHUTDOWN_ABANDON_PENDING)
            except _nbd.Error:
                pass

    def _handle(self) -> Any:
        if self._h is None:
            raise ConnectionResetError(errno.ECONNRESET, "NBD connection closed")
        return self._h

    def _call(self, fn: Callable[..., object], *args: object) -> object:
        h = self._handle()
        try:
            return fn(*args)
        except _nbd.Error as e:
            if h.aio_is_dead() or h.aio_is_closed():
                raise ConnectionResetError(errno.ECONNRESET,
                                           "NBD connection broke: %s" % e.string) from None
            raise _os_error(e, "NBD server") from None

    def pread(self, buf: memoryview, offset: int) -> None:
        h = self._handle()
        for piece, off in _pieces(len(buf), offset, MAX_REQUEST):
            data = self._call(h.pread, piece, off)
            assert isinstance(data, (bytes, bytearray)) and len(data) == piece
            buf[off - offset:off - offset + piece] = data

    def pwrite(self, buf: memoryview, offset: int, fua: bool) -> None:
        h, flags = self._handle(), _nbd.CMD_FLAG_FUA if fua else 0
        for piece, off in _pieces(len(buf), offset, MAX_REQUEST):
            part = buf[off - offset:off - offset + piece]
            self._call(h.pwrite, part, off, flags)

    def flush(self) -> None:
        self._call(self._handle().flush)

    def zero(self, offset: int, length: int, may_trim: bool, fua: bool) -> None:
        h = self._handle()
        flags = (0 if may_trim else _nbd.CMD_FLAG_NO_HOLE) | (_nbd.CMD_FLAG_FUA if fua else 0)
        for piece, off in _pieces(length, offset, MAX_ZERO):
            self._call(h.zero, piece, off, flags)


def _os_error(e: Any, what: str) -> OSError:
    """libnbd's error as an OSError of its errno (FileNotFoundError, ConnectionRefusedError,
    ... by the errno, as the pure client raises them)."""
    num = getattr(e, "errnum", None) or errno.EIO
    return OSError(num, "%s: %s" % (what, getattr(e, "string", None) or os.strerror(num)))


try:
    import nbd as _nbd  # libnbd's binding (python3-libnbd)
except ImportError:
    _nbd = None


def native() -> bool:
    """Does ``connect`` use libnbd?"""
    return _nbd is not None and os.environ.get("FERRY_NBD_CLIENT", "") != "python"


def connect(path: str) -> Any:
    """A connection to the default export of the Unix socket ``path``: libnbd's where it is
    there (``native``), else the pure-Python one."""
    return NativeConnection(path) if native() else Connection(path)


def _pieces(length: int, offset: int, most: int) -> List[tuple]:
    return [(min(most, length - done), offset + done) for done in range(0, length, most)]


class Pool:
    """Connections to one socket, one per concurrent caller, made as needed.

    ``connect`` makes a connection (and may start the server first). A connection whose
    request fails with ``ConnectionError`` is dropped; ``on_broken`` is told once per drop.
    ``keeper`` stays open while the pool lives: qemu-nbd ends when its last connection
    closes, so the server lives exactly as long as this pool's process. It is made by
    ``keep`` (default: ``connect``): the splitter's keeper is made before nbdkit forks, and
    must be a plain socket that the parent's exit closes without a word to the server."""

    def __init__(self, connect: Callable[[], Any],
                 keep: Optional[Callable[[], Any]] = None) -> None:
        self._connect = connect
        self._idle: List[Any] = []
        self._lock = threading.Lock()
        self.on_broken: Callable[[BaseException], None] = lambda e: None
        self.keeper: Optional[Any] = (keep or connect)()
        self.size = self.keeper.size
        self.flags = self.keeper.flags

    def run(self, fn: Callable[[Any], object]) -> object:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._make()
        try:
            result = fn(conn)
        except ConnectionError as e:
            conn.drop()
            self.on_broken(e)
            raise OSError(errno.EIO, "connection to qemu-nbd broke: %s" % e) from None
        except OSError:
            self._put(conn)  # the server's error for this request: the connection is fine
            raise
        except BaseException:
            conn.drop()  # stopped half-way: what the server sends next is unknown
            raise
        self._put(conn)
        return result

    def _put(self, conn: Any) -> None:
        with self._lock:
            self._idle.append(conn)

    def _make(self) -> Any:
        try:
            return self._connect()
        except OSError as e:
            raise OSError(e.errno or errno.EIO, "cannot reach qemu-nbd: %s" % e) from None

    def close(self) -> None:
        with self._lock:
            conns, self._idle = self._idle, []
        for c in conns:
            c.close()
        if self.keeper is not None:
            self.keeper.close()
            self.keeper = None
