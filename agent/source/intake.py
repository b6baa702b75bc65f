"""The agent's Unix socket that splitters connect to, one connection a disk.

Theory of operation
-------------------
Each splitter connects, says HELLO (its disk id and generation), and then streams its
disk's records in sequence order (RECORDS), its counters (STATE) and its answers to a
sync request (SYNC_REPLY). The splitter keeps every record until the target has acked it;
the agent keeps none. That is what lets the agent crash, restart, or lose its link at any
moment: whatever was in flight is simply sent again. This module only reads the local
wire and hands each message to the disk's ``DiskLink``; a splitter of a disk the agent does
not know is closed, one that breaks the local protocol is dropped with a log line.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from typing import Callable, Optional

import trio

from formats import localwire as lw

from ..protocol.stream import read_exact as read_exact_from
from .link import DiskLink

log = logging.getLogger("ferry.source")

LinkOf = Callable[[str], Optional[DiskLink]]


async def bind(path: str) -> trio.SocketListener:
    """The splitters' socket at ``path`` (a stale one is replaced), for root only: made
    0600 before it listens, so no other local user can pose as a splitter."""
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    await sock.bind(path)
    os.chmod(path, 0o600)
    sock.listen(64)
    return trio.SocketListener(sock)


async def serve(listener: trio.SocketListener, link_of: LinkOf) -> None:
    """Take splitter connections until cancelled; ``link_of`` finds a disk's link by id."""
    async def handler(stream: trio.SocketStream) -> None:
        await splitter_conn(stream, link_of)

    await trio.serve_listeners(handler, [listener])


async def splitter_conn(stream: trio.SocketStream, link_of: LinkOf) -> None:
    link: Optional[DiskLink] = None

    async def read_exact(n: int) -> bytes:
        return await read_exact_from(stream, n, "splitter")

    try:
        msg_type, length = lw.unpack_header(await read_exact(lw.HEADER.size))
        if msg_type != lw.MSG_HELLO:
            raise lw.ProtocolError("splitter did not start with HELLO")
        hello = lw.unpack_json(await read_exact(length))
        link = link_of(str(hello.get("disk_id")))
        if link is None:
            log.warning("a splitter for unknown disk %r connected; closing it",
                        hello.get("disk_id"))
            return
        await link.attach(stream, int(hello.get("gen", 0)), hello.get("fence") == 1,
                          hello.get("resync") == 1)
        while True:
            msg_type, length = lw.unpack_header(await read_exact(lw.HEADER.size))
            payload = await read_exact(length)
            if msg_type == lw.MSG_RECORDS:
                watermark, records = lw.unpack_records(payload)
                await link.received(watermark, records)
            elif msg_type == lw.MSG_STATE:
                link.update_counters(lw.unpack_json(payload), time.time())
            elif msg_type == lw.MSG_SYNC_REPLY:
                reply = lw.unpack_json(payload)
                link.sync_replies[str(reply["token"])] = (int(reply["gen"]),
                                                          int(reply["seq"]))
            else:
                raise lw.ProtocolError("unexpected message type %d" % msg_type)
    except (EOFError, trio.BrokenResourceError, trio.ClosedResourceError,
            ConnectionError) as e:
        if link is not None:
            log.info("splitter for %s/%s disconnected: %s", link.row.group, link.row.name, e)
    except (lw.ProtocolError, KeyError, ValueError) as e:
        log.error("dropping splitter connection: %s", e)
    finally:
        if link is not None and link.stream is stream:
            link.detach(stream)
        await stream.aclose()
