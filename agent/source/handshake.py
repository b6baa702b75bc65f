"""Opening a session with the target: HELLO, OPEN, and what the target says it holds.

``open_session`` serves both the shipper (a session that then carries BATCHes and ACKs)
and ``probe``, which ``protect`` asks first: does the target take this group?
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, List, Optional, Tuple

import trio

from .. import tls
from ..errors import Forbidden, PeerRefused, Unavailable
from ..pairing import NotPaired, how_to_pair, refused_us
from ..protocol import frames, messages
from ..protocol.session import SourceSession
from ..protocol.stream import SessionStream, keepalive
from ..store import GroupRow
from .seeds import SeedList, add_frame
from .settings import DEFAULT_SETTINGS, parse_target

log = logging.getLogger("ferry.source")

Connector = Callable[[str, int, str], Awaitable[trio.abc.Stream]]


async def plain_connect(host: str, port: int, address: str) -> trio.abc.Stream:
    """Plain TCP (an ``--insecure`` agent, unit tests); ``Trust.connect`` does TLS."""
    stream = await trio.open_tcp_stream(host, port)
    keepalive(stream)
    return stream


def session_stream(stream: trio.abc.Stream, target: str) -> SessionStream:
    """A connection to ``target`` that carries the source's end of a session."""
    return SessionStream(stream, target, SourceSession())


def open_message(row: GroupRow, probe: bool, held: Optional[int] = None) -> messages.Open:
    """The OPEN that names ``row``'s group, its disks and its settings (``held``: the bytes
    of writes this site holds that the target never acked; a failed-over target calls that
    split brain)."""
    settings = dict(DEFAULT_SETTINGS, **row.settings)
    seeds = settings.get("seeds") or None  # pre-seeded sync: site B's files (agent/seed.py)
    domains = settings.get("domains")  # their definitions travel with the group
    return messages.Open(row.name, row.protection, tuple((d.name, d.size) for d in row.disks),
                         probe, (int(settings["history_s"]), int(settings["journal_max"])),
                         dict(seeds) if seeds else None, held=held,
                         domains=tuple(domains) if domains and not probe else None,
                         reserve=bool(settings.get("journal_reserve")),
                         replica_format=str(settings["replica_format"]))


async def open_session(fs: SessionStream, row: GroupRow, site_id: str, probe: bool,
                       seeds: Optional[List[Optional[SeedList]]] = None,
                       held: Optional[int] = None) -> List[Tuple[int, int]]:
    """HELLO, OPEN; the target's durable points, and its SEED frames into ``seeds``."""
    try:
        # Under TLS 1.3 the target checks our certificate after our side of the handshake
        # is done: its refusal shows up on the first send or the first read, whichever
        # meets the closed session first.
        await fs.send(messages.Hello(site_id))
        await fs.expect(messages.Welcome)
    except (EOFError, trio.BrokenResourceError):
        if isinstance(fs.stream, tls.TLSSocketStream):
            raise refused_us(row.target) from None  # it did not take our certificate
        raise
    await fs.send(open_message(row, probe, held))
    opened = await fs.expect(messages.Opened)
    sizes = [d.size for d in row.disks]
    for _ in range(opened.seed_frames):
        msg = await fs.expect(messages.Seed)
        if seeds is not None:
            add_frame(msg, seeds, sizes)
    return list(opened.durable)


async def probe(connect: Connector, row: GroupRow, site_id: str,
                allow_unreachable: bool) -> None:
    """Does the target take this new group? A RequestError that says why not, unless it
    is only unreachable and ``allow_unreachable`` (then a warning)."""
    host, port = parse_target(row.target)
    try:
        with trio.fail_after(10):
            stream = await connect(host, port, row.target)
            fs = session_stream(stream, row.target)
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
