"""Opening a session with the target: HELLO, OPEN, and what the target says it holds.

``open_session`` serves both the shipper (a session that then carries BATCHes and ACKs)
and ``probe``, which ``protect`` asks first: does the target take this group?
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, List, Optional, Tuple

import trio

from .. import seed, tls
from ..errors import Forbidden, PeerRefused, Unavailable
from ..pairing import NotPaired, how_to_pair, refused_us
from ..protocol import frames
from ..protocol.stream import FrameStream, keepalive
from ..store import GroupRow
from .settings import DEFAULT_SETTINGS, parse_target

log = logging.getLogger("ferry.source")

PROTOCOL = 1
Connector = Callable[[str, int, str], Awaitable[trio.abc.Stream]]


async def plain_connect(host: str, port: int, address: str) -> trio.abc.Stream:
    """Plain TCP (an ``--insecure`` agent, unit tests); ``Trust.connect`` does TLS."""
    stream = await trio.open_tcp_stream(host, port)
    keepalive(stream)
    return stream


def parse_durable(body: dict, ndisks: int) -> List[Tuple[int, int]]:
    raw = frames.field(body, "durable", list)
    if len(raw) != ndisks:
        raise frames.ProtocolError("durable list of %d disks for a group of %d"
                                 % (len(raw), ndisks))
    out = []
    for d in raw:
        if not (isinstance(d, list) and len(d) == 2 and all(isinstance(x, int) for x in d)):
            raise frames.ProtocolError("bad durable entry %r" % (d,))
        out.append((d[0], d[1]))
    return out


async def open_session(fs: FrameStream, row: GroupRow, site_id: str, probe: bool,
                       seeds: Optional[List[Optional[seed.SeedList]]] = None
                       ) -> List[Tuple[int, int]]:
    """HELLO, OPEN; the target's durable points, and its SEED frames into ``seeds``."""
    try:
        # Under TLS 1.3 the target checks our certificate after our side of the handshake
        # is done: its refusal shows up on the first send or the first read, whichever
        # meets the closed session first.
        await fs.send(frames.T_HELLO, {"protocol": PROTOCOL, "site": site_id})
        await fs.expect(frames.T_WELCOME)
    except (EOFError, trio.BrokenResourceError):
        if isinstance(fs.stream, tls.TLSSocketStream):
            raise refused_us(row.target) from None  # it did not take our certificate
        raise
    settings = dict(DEFAULT_SETTINGS, **row.settings)
    body = {"group": row.name, "protection": row.protection, "probe": probe,
            "disks": [{"name": d.name, "size": d.size} for d in row.disks],
            "history_s": int(settings["history_s"]),
            "journal_max": int(settings["journal_max"])}
    if settings.get("seeds"):
        body["seeds"] = settings["seeds"]  # pre-seeded sync: site B's files (agent/seed.py)
    await fs.send(frames.T_OPEN, body)
    opened = await fs.expect(frames.T_OPENED)
    durable = parse_durable(opened, len(row.disks))
    nseed = opened.get("seed_frames", 0)
    if seeds is not None and isinstance(nseed, int):
        for _ in range(nseed):
            seed.parse_frame(await fs.expect(frames.T_SEED), seeds, [d.size for d in row.disks])
    return durable


async def probe(connect: Connector, row: GroupRow, site_id: str,
                allow_unreachable: bool) -> None:
    """Does the target take this new group? A RequestError that says why not, unless it
    is only unreachable and ``allow_unreachable`` (then a warning)."""
    host, port = parse_target(row.target)
    try:
        with trio.fail_after(10):
            stream = await connect(host, port, row.target)
            fs = FrameStream(stream, row.target)
            try:
                await open_session(fs, row, site_id, probe=True)
            finally:
                await fs.aclose()
    except NotPaired as e:
        raise Forbidden(str(e)) from None
    except frames.RemoteError as e:
        if e.code in (frames.E_TLS_REQUIRED, frames.E_UNPAIRED):
            raise Forbidden("target %s accepts only TLS from paired sites and this "
                            "agent runs --insecure: start it without --insecure, then "
                            "%s" % (row.target, how_to_pair(row.target))) from None
        raise PeerRefused("target %s refused the group: %s" % (row.target, e)) from None
    except (OSError, EOFError, trio.TooSlowError, frames.ProtocolError,
            trio.BrokenResourceError) as e:
        if allow_unreachable:
            log.warning("group %s: target %s unreachable (%s); protecting anyway",
                        row.name, row.target, e)
            return
        raise Unavailable("target %s unreachable: %s (start its agent, or pass "
                          "--allow-unreachable)" % (row.target, e or type(e).__name__)
                          ) from None
