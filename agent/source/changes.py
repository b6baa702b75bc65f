"""What the shipper needs from a disk's change source, and what a change source feeds.

Theory of operation
-------------------
The shipper of a group ships change streams, one a disk, and knows nothing of where they
come from. Today each is a splitter's socket (``link.DiskLink``); after a failover, site B's
live export can be one (failback) by implementing the same few calls.

The shipper binds every stream to itself (``bind``) with the disk's index in the group.
When a session opens, it tells each stream what the target holds (``start_forwarding``);
the stream then delivers its records strictly in sequence from there to the sink
(``ChangeSink.deliver``), and tells it when its source restarted with a new generation
(``ChangeSink.restarted``), which no checkpoint may span. The target's acks go back to the
stream (``ack``), which lets its source free what is now durable; when the session ends, the
shipper stops it (``stop_forwarding``). ``inconsistent`` says a resync runs, so that no
automatic checkpoint is cut across it, and ``shipped`` counts what went out. When the
target holds the group failed over, the shipper ``fence``s every stream: its source must
take no more writes (``unreplicated_bytes`` says how much it holds that the target never
got).
"""

from __future__ import annotations

from typing import Any, List, Optional, Protocol, Tuple

from formats import localwire as lw

Point = Tuple[int, int]   # (generation, sequence)


class ChangeSink(Protocol):
    """Where a change stream delivers (the group's shipper)."""

    @property
    def live(self) -> bool:
        """A session is open: records delivered now are shipped."""
        ...

    async def deliver(self, index: int, records: List[lw.Record], watermark: int,
                      whole: bool) -> None:
        """Records of disk ``index`` in sequence; ``watermark`` (CLOCK_MONOTONIC ns) holds for
        them if ``whole`` (none was left out)."""

    def restarted(self, index: int) -> None:
        """Disk ``index``'s source started a new generation."""


class ChangeStream(Protocol):
    """One disk's changes, in sequence, from a point the target names."""

    def bind(self, sink: ChangeSink, index: int) -> None:
        """Deliver to ``sink`` as disk ``index`` of its group from now on."""

    @property
    def inconsistent(self) -> bool:
        """A resync (or initial sync) runs: the disk has no crash-consistent point now."""
        ...

    async def start_forwarding(self, durable: Point) -> None:
        """The target holds ``durable``: deliver what comes after it (a rewind)."""

    def stop_forwarding(self) -> None:
        """The session ended: deliver nothing until the next ``start_forwarding``."""

    async def ack(self, durable: Point) -> None:
        """The target holds ``durable``: its source may free what came before."""

    def shipped(self, record: Any) -> None:
        """``record`` went out to the target (as data, as a seeded reference or a range)."""

    async def resync(self, ranges: List[Tuple[int, int]]) -> bool:
        """Read these ranges from the source again and deliver them (a repair); False when
        the source cannot now."""
        ...

    async def fence(self, reason: Optional[str]) -> None:
        """Refuse writes at the source for ``reason`` (None: take them again)."""

    @property
    def unreplicated_bytes(self) -> int:
        """Bytes of changes the source holds that the target has not acked."""
        ...
