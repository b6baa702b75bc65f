"""A small blocking NBD client: enough to reach qemu-nbd on a Unix socket.

Standard library only (the splitter runs in nbdkit's embedded Python, where libnbd's binding
may be missing). Fixed newstyle handshake, ``NBD_OPT_GO`` for the default export, simple
replies only (structured replies are never asked for), one request at a time per
connection: a caller that wants parallel I/O opens several (``Pool``).

Every request either completes or raises ``OSError``: the server's error as its errno (NBD's
error numbers are Linux's), or ``ConnectionError`` (EPIPE/ECONNRESET) when the connection broke,
after which the connection is unusable. Large requests are split into pieces of at most
``MAX_REQUEST`` bytes (qemu-nbd refuses more than 32 MiB).
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import threading
from typing import Callable, List, Optional

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


def _pieces(length: int, offset: int, most: int) -> List[tuple]:
    return [(min(most, length - done), offset + done) for done in range(0, length, most)]


class Pool:
    """Connections to one socket, one per concurrent caller, made as needed.

    ``connect`` makes a connection (and may start the server first). A connection whose
    request fails with ``ConnectionError`` is dropped; ``on_broken`` is told once per drop.
    ``keeper`` stays open while the pool lives: qemu-nbd ends when its last connection
    closes, so the server lives exactly as long as this pool's process."""

    def __init__(self, connect: Callable[[], Connection]) -> None:
        self._connect = connect
        self._idle: List[Connection] = []
        self._lock = threading.Lock()
        self.on_broken: Callable[[BaseException], None] = lambda e: None
        self.keeper: Optional[Connection] = connect()
        self.size = self.keeper.size
        self.flags = self.keeper.flags

    def run(self, fn: Callable[[Connection], object]) -> object:
        with self._lock:
            conn = self._idle.pop() if self._idle else None
        if conn is None:
            conn = self._make()
        try:
            result = fn(conn)
        except ConnectionError as e:
            conn.sock.close()
            self.on_broken(e)
            raise OSError(errno.EIO, "connection to qemu-nbd broke: %s" % e) from None
        except OSError:
            self._put(conn)  # the server's error for this request: the connection is fine
            raise
        except BaseException:
            conn.sock.close()  # stopped half-way: what the server sends next is unknown
            raise
        self._put(conn)
        return result

    def _put(self, conn: Connection) -> None:
        with self._lock:
            self._idle.append(conn)

    def _make(self) -> Connection:
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
