"""A connection between two agents as a stream of frames (trio; no protocol logic here)."""

from __future__ import annotations

import socket
from typing import Any, Awaitable, Callable, List, Optional, Tuple

import trio

from . import frames as wire


class FrameStream:
    def __init__(self, stream: trio.abc.Stream, peer: str, codec: Optional[wire.Codec] = None):
        self.stream = stream
        self.peer = peer
        self.codec = codec or wire.Codec()
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def _read_exact(self, n: int) -> bytes:
        return await read_exact(self.stream, n, self.peer, self)

    async def receive(self) -> Tuple[int, dict]:
        """The next frame as (type, body); ProtocolError if it does not hold together."""
        header = self.codec.decode_header(await self._read_exact(wire.HEADER.size))
        body = await self._read_exact(header.length)
        if header.length > 1024 * 1024:
            obj = await trio.to_thread.run_sync(self.codec.decode_body, header, body)
        else:
            obj = self.codec.decode_body(header, body)
        if header.type == wire.T_ERROR:
            raise wire.RemoteError(str(obj.get("code", "")), str(obj.get("message", "")))
        return header.type, obj

    async def expect(self, ftype: int) -> dict:
        got, obj = await self.receive()
        if got != ftype:
            raise wire.ProtocolError("expected %s, got %s"
                                     % (wire.TYPE_NAMES[ftype], wire.TYPE_NAMES[got]))
        return obj

    async def send_frame(self, frame: bytes) -> None:
        async with self._send_lock:
            await self.stream.send_all(frame)
            self.bytes_sent += len(frame)

    async def send(self, ftype: int, obj: Any) -> None:
        await self.send_frame(self.codec.encode(ftype, obj))

    async def send_error(self, code: str, message: str) -> None:
        """Tell the peer why we hang up; a peer already gone is no news."""
        try:
            with trio.move_on_after(2):
                await self.send(wire.T_ERROR, {"code": code, "message": message})
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
            pass

    async def aclose(self) -> None:
        with trio.CancelScope(shield=True):
            await self.stream.aclose()


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
