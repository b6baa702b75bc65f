"""The trio side of a session: moves bytes between a socket and a ``session.Session``.

No protocol logic here: what may be sent or received, and what a body means, is the
session's (``session.py``, ``messages.py``). ``SessionStream`` reads exactly the bytes the
session wants next (a frame's header, then its body), parses a large body in a worker
thread so the event loop is not held by decompression, and sends what the session encodes.
"""

from __future__ import annotations

import socket
from typing import Any, Awaitable, Callable, List, TypeVar

import trio

from ..errors import LocalProtocolError
from . import frames as wire
from . import messages
from .session import NEED_DATA, Session

M = TypeVar("M", bound=messages.Message)
PARSE_IN_THREAD = 1024 * 1024  # bodies at least this long are parsed off the event loop
LINGER = 2.0  # seconds a close after an ERROR waits for the peer to read it and hang up


class SessionStream:
    """A connection carrying one session (source or target end)."""

    def __init__(self, stream: trio.abc.Stream, peer: str, session: Session) -> None:
        self.stream = stream
        self.peer = peer
        self.session = session
        self._send_lock = trio.Lock()
        self._said_error = False
        self.authenticated = False  # set once the peer proved who it is: only then lingers

    @property
    def codec(self) -> wire.Codec:
        return self.session.codec

    @property
    def bytes_sent(self) -> int:
        return self.session.bytes_sent

    @property
    def bytes_received(self) -> int:
        return self.session.bytes_received

    async def receive(self) -> messages.Message:
        """The next message, checked. EOFError when the peer closed; frames.RemoteError
        for its ERROR; frames.ProtocolError for anything that does not hold together."""
        session = self.session
        while True:
            if session.pending_length >= PARSE_IN_THREAD and session.wanted() == 0:
                event = await trio.to_thread.run_sync(session.next_event)
            else:
                event = session.next_event()
            if event is not NEED_DATA:
                assert isinstance(event, messages.Message)
                return event
            data = await self.stream.receive_some(session.wanted())
            session.receive_data(bytes(data) if isinstance(data, bytearray) else data)

    async def expect(self, kind: type[M]) -> M:
        """The next message, which must be a ``kind`` (else frames.ProtocolError)."""
        msg = await self.receive()
        if not isinstance(msg, kind):
            raise wire.ProtocolError("expected %s, got %s" % (
                wire.TYPE_NAMES[kind.TYPE], wire.TYPE_NAMES[msg.TYPE]))
        return msg

    async def send(self, msg: messages.Message, compress: bool = False) -> None:
        async with self._send_lock:
            await self.stream.send_all(self.session.send(msg, compress))

    async def send_frame(self, msg_type: int, frame: wire.Frame) -> None:
        """Send a frame encoded elsewhere (a large BATCH encoded in a worker thread)."""
        async with self._send_lock:
            self.session.sent_frame(msg_type, frame)
            await self.stream.send_all(frame)

    async def send_error(self, code: str, message: str) -> None:
        """Tell the peer why we hang up; a peer already gone, or a session already ended,
        is no news."""
        try:
            with trio.move_on_after(2):
                await self.send(messages.Error(code, message))
                self._said_error = True
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError,
                LocalProtocolError):
            pass

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            if self._said_error and self.authenticated:
                await self._linger()
            await self.stream.aclose()

    async def _linger(self) -> None:
        """After an ERROR, close only once the peer has hung up (or LINGER s have passed).
        Closing a socket with unread bytes in it sends a reset at once: a peer still
        sending then sees "connection reset" where it should have read why, and a reset
        may even drop the ERROR from the peer's receive queue. So: our side's FIN where the
        transport has one, then read and drop what the peer still sends until its EOF.
        Only for an authenticated peer: a stranger is not given LINGER s of our reading."""
        with trio.move_on_after(LINGER):
            try:
                if isinstance(self.stream, trio.abc.HalfCloseableStream):
                    await self.stream.send_eof()
                while await self.stream.receive_some(64 * 1024):
                    pass
            except (trio.BrokenResourceError, trio.ClosedResourceError, trio.BusyResourceError,
                    OSError):
                pass


async def read_exact(stream: trio.abc.ReceiveStream, n: int, peer: str,
                     counter: Any = None) -> bytes:
    """Exactly ``n`` bytes from ``stream``. Never asks for more than is missing, so nothing
    is left over to keep, and a large body costs one copy (the join)."""
    chunks = []
    have = 0
    while have < n:
        chunk = await stream.receive_some(n - have)
        if not chunk:
            raise EOFError("%s closed the connection" % peer)
        chunks.append(chunk)
        have += len(chunk)
    if counter is not None:
        counter.bytes_received += n
    first = chunks[0] if chunks else b""
    return first if len(chunks) == 1 and isinstance(first, bytes) else b"".join(chunks)


def keepalive(stream: trio.SocketStream) -> None:
    """Notice a peer that vanished without a word (host down, link cut) within ~30 s."""
    sock = stream.socket
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 10)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 5)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3)
    # Unacked data older than this also ends the connection.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, 30_000)


async def race(*fns: Callable[[], Awaitable[Any]]) -> None:
    """Run ``fns`` together until the first one returns or fails; cancel the others and
    re-raise the first failure as itself (not wrapped in an exception group)."""
    failure: List[BaseException] = []

    async with trio.open_nursery() as nursery:
        async def one(fn: Callable[[], Awaitable[Any]]) -> None:
            try:
                await fn()
            except Exception as e:
                if not failure:
                    failure.append(e)
            finally:
                nursery.cancel_scope.cancel()

        for fn in fns:
            nursery.start_soon(one, fn)
    if failure:
        raise failure[0]
