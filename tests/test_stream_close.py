"""A side that hangs up with an ERROR is heard: it closes only after the peer has read
the ERROR and hung up, so a peer still sending gets the reason, not "connection reset".

Closing a TCP socket with unread bytes in it sends a reset at once; the peer's next send
then fails with ECONNRESET, and a peer that learns of the end from its sending task (the
source's shipper does) reports "link lost" where site B said "journal full" (seen in CI:
site A never raised the third journal-full alert of test_journal_full_alert)."""

from __future__ import annotations

import socket
from typing import List

import pytest
import trio
import trio.testing

from agent.protocol import frames, stream
from agent.protocol.session import SourceSession, TargetSession
from agent.protocol.stream import SessionStream

FLOOD = 64 * 1024


async def hang_up_with_an_error(linger: bool) -> List[str]:
    """Site B's end says ERROR and closes while site A's end keeps sending; what A saw."""
    seen: List[str] = []
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]

    async def target(conn: trio.SocketStream) -> None:
        fs = SessionStream(conn, "A", TargetSession())
        fs.authenticated = True  # as after a paired site's HELLO
        await conn.receive_some(1)  # A is sending; nothing more of it is read
        await trio.sleep(0.3)       # ... while A fills the socket's buffers
        await fs.send_error(frames.E_JOURNAL_FULL, "site B's file system is full")
        if not linger:
            fs._said_error = False  # the close before this fix
        await fs.aclose()

    async def source(conn: trio.SocketStream) -> None:
        fs = SessionStream(conn, "B", SourceSession())

        async def send() -> None:
            try:
                while True:
                    await conn.send_all(b"\0" * FLOOD)
                    await trio.sleep(0.01)
            except (trio.BrokenResourceError, OSError) as e:
                seen.append("send failed: %s" % (e.__cause__ or e))
                nursery.cancel_scope.cancel()

        async def receive() -> None:
            try:
                await fs.receive()
            except frames.RemoteError as e:
                seen.append("error %s: %s" % (e.code, e))
            except (trio.BrokenResourceError, OSError, EOFError) as e:
                seen.append("receive failed: %s" % (e.__cause__ or e))
            nursery.cancel_scope.cancel()

        async with trio.open_nursery() as nursery:
            nursery.start_soon(send)
            nursery.start_soon(receive)
        await trio.aclose_forcefully(conn)

    with trio.fail_after(10):
        async with trio.open_nursery() as outer:
            async def serve() -> None:
                conn = await listeners[0].accept()
                await target(conn)
            outer.start_soon(serve)
            client = await trio.open_tcp_stream("127.0.0.1", port)
            client.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, FLOOD)
            await source(client)
    await listeners[0].aclose()
    return seen


@pytest.mark.parametrize("linger", [True, False], ids=["lingering", "plain-close"])
def test_a_peer_still_sending_reads_the_error(linger: bool) -> None:
    seen = [trio.run(hang_up_with_an_error, linger) for _ in range(5)]
    error = "error journal-full: site B's file system is full"
    if linger:
        assert all(s == [error] for s in seen), seen
    else:  # the control: without the linger, A's sending fails with a reset
        assert any(x.startswith("send failed") for s in seen for x in s), seen


async def main(authenticated: bool) -> float:
    """How long closing takes after an ERROR, to a peer that neither reads nor closes."""
    a, _b = trio.testing.memory_stream_pair()
    fs = SessionStream(a, "A", TargetSession())
    fs.authenticated = authenticated
    await fs.send_error(frames.E_STORAGE, "gone")
    started = trio.current_time()
    await fs.aclose()
    return trio.current_time() - started


def test_the_linger_ends_when_the_peer_never_hangs_up() -> None:
    took = trio.run(main, True, clock=trio.testing.MockClock(autojump_threshold=0))
    assert took == pytest.approx(stream.LINGER)


def test_a_stranger_is_not_lingered_for() -> None:
    """Before a paired site's HELLO the peer may be anyone: its ERROR is sent and the
    connection closed at once (test_preauth holds B's cost of strangers to a budget)."""
    took = trio.run(main, False, clock=trio.testing.MockClock(autojump_threshold=0))
    assert took == 0


async def reset_while_lingering() -> float:
    """Site A breaks the connection (a reset) while site B drains it after an ERROR."""
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    client = await trio.open_tcp_stream("127.0.0.1", port)
    conn = await listeners[0].accept()
    fs = SessionStream(conn, "A", TargetSession())
    fs.authenticated = True
    await client.send_all(b"\0" * FLOOD)         # unread bytes on B's side
    await fs.send_error(frames.E_STORAGE, "gone")
    started = trio.current_time()
    async with trio.open_nursery() as nursery:
        async def reset() -> None:
            await trio.sleep(0.2)                # B is lingering by now
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\1\0\0\0\0\0\0\0")
            client.socket.close()                # SO_LINGER 0: a reset, not a FIN
        nursery.start_soon(reset)
        await fs.aclose()                        # no exception: the reset ends the linger
    await listeners[0].aclose()
    return trio.current_time() - started


def test_a_reset_while_lingering_ends_the_close_quietly() -> None:
    took = trio.run(reset_while_lingering)
    assert 0.1 < took < stream.LINGER / 2, took
