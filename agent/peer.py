"""A connection between two agents as a stream of frames (trio; no protocol logic here)."""

from __future__ import annotations

import socket
from typing import Any, Awaitable, Callable, List, Optional, Tuple

import trio

from . import wire


class FrameStream:
    def __init__(self, stream: trio.abc.Stream, peer: str, codec: Optional[wire.Codec] = None):
        self.stream = stream
        self.peer = peer
        self.codec = codec or wire.Codec()
        self._buf = bytearray()
        self._send_lock = trio.Lock()
        self.bytes_sent = 0
        self.bytes_received = 0

    async def _read_exact(self, n: int) -> bytes:
        while len(self._buf) < n:
            chunk = await self.stream.receive_some(max(65536, n - len(self._buf)))
            if not chunk:
                raise EOFError("%s closed the connection" % self.peer)
            self._buf += chunk
            self.bytes_received += len(chunk)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

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
