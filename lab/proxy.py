"""A fault proxy between two sites on loopback: cut, stall, delay, throttle, corrupt.

    proxy = FaultProxy(("127.0.0.1", target_port)).start()   # listens on proxy.port
    proxy.cut()        # close every connection, refuse new ones (RST-like)
    proxy.stall()      # keep connections open, move no byte (a black hole)
    proxy.delay(0.2)   # hold each chunk that long before passing it on
    proxy.throttle(2_000_000)   # bytes per second, each direction
    proxy.corrupt(1)   # flip one byte in the next chunk that passes (either direction)
    proxy.heal()       # back to a clean link
    proxy.close()

The proxy runs its own trio loop in a thread, so that synchronous tests can drive it while
real agents (separate processes) talk through it. Faults are plain attributes read by the
pumps between chunks; ``cut`` also bumps an epoch that every open connection watches.
Only loopback addresses are used.
"""

from __future__ import annotations

import threading
import time
from typing import Optional, Tuple

import trio

CHUNK = 64 * 1024


class FaultProxy:
    def __init__(self, target: Tuple[str, int], listen_host: str = "127.0.0.1") -> None:
        self.target = target
        self.listen_host = listen_host
        self.port = 0
        self.connections = 0          # accepted so far
        self.bytes = 0                # passed on so far
        self._cut = False
        self._stalled = False
        self._delay = 0.0
        self._rate = 0.0              # bytes/s, 0 = unlimited
        self._corrupt = 0             # chunks left to corrupt
        self._epoch = 0
        self._thread: Optional[threading.Thread] = None
        self._ready = threading.Event()
        self._stop: Optional[trio.Event] = None
        self._token: Optional[trio.lowlevel.TrioToken] = None
        self._error: Optional[BaseException] = None

    # -- control (any thread) -------------------------------------------------------------

    def cut(self) -> None:
        self._cut = True
        self._epoch += 1

    def stall(self) -> None:
        self._stalled = True

    def delay(self, seconds: float) -> None:
        self._delay = seconds

    def throttle(self, bytes_per_second: float) -> None:
        self._rate = bytes_per_second

    def corrupt(self, chunks: int = 1) -> None:
        self._corrupt = chunks

    def heal(self) -> None:
        self._cut = self._stalled = False
        self._delay = self._rate = 0.0
        self._corrupt = 0

    @property
    def address(self) -> str:
        return "%s:%d" % (self.listen_host, self.port)

    def start(self) -> FaultProxy:
        self._thread = threading.Thread(target=self._run, name="fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("fault proxy did not start")
        if self._error is not None:
            raise RuntimeError("fault proxy failed: %s" % self._error)
        return self

    def close(self) -> None:
        if self._token is not None and self._stop is not None:
            try:
                trio.from_thread.run_sync(self._stop.set, trio_token=self._token)
            except trio.RunFinishedError:
                pass
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the proxy (its own trio loop) ----------------------------------------------------

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as e:  # reported to start() or lost with the thread
            self._error = e
            self._ready.set()

    async def _main(self) -> None:
        self._stop = trio.Event()
        self._token = trio.lowlevel.current_trio_token()
        listeners = await trio.open_tcp_listeners(self.port, host=self.listen_host)
        self.port = listeners[0].socket.getsockname()[1]
        self._ready.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.serve_listeners, self._handle, listeners)
            await self._stop.wait()
            nursery.cancel_scope.cancel()

    async def _handle(self, downstream: trio.SocketStream) -> None:
        self.connections += 1
        if self._cut:
            await downstream.aclose()
            return
        try:
            upstream = await trio.open_tcp_stream(*self.target)
        except OSError:
            await downstream.aclose()
            return
        epoch = self._epoch
        async with downstream, upstream:
            async with trio.open_nursery() as nursery:
                async def watch() -> None:
                    # Polled: cut() is called from other threads, outside this trio loop.
                    while self._epoch == epoch:  # noqa: ASYNC110
                        await trio.sleep(0.01)
                    nursery.cancel_scope.cancel()

                async def pump(src: trio.SocketStream, dst: trio.SocketStream) -> None:
                    try:
                        await self._pump(src, dst)
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch)
                nursery.start_soon(pump, downstream, upstream)
                nursery.start_soon(pump, upstream, downstream)

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        while True:
            data = await src.receive_some(CHUNK)
            if not data:
                return
            while self._stalled:  # noqa: ASYNC110 (set from other threads)
                await trio.sleep(0.01)
            if self._delay:
                await trio.sleep(self._delay)
            if self._corrupt > 0:
                self._corrupt -= 1
                buf = bytearray(data)
                buf[len(buf) // 2] ^= 0xFF
                data = bytes(buf)
            if self._rate:
                start = time.monotonic()
                await dst.send_all(data)
                spent = time.monotonic() - start
                await trio.sleep(max(0.0, len(data) / self._rate - spent))
            else:
                await dst.send_all(data)
            self.bytes += len(data)
