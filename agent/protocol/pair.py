"""Both ends of a session joined in memory: the protocol without sockets (h11's
ConnectionPair). Tests and the fuzzer drive it; nothing here does I/O.
"""

from __future__ import annotations

from typing import List

from .messages import Message
from .session import NEED_DATA, Session, SourceSession, TargetSession


def feed(session: Session, data: bytes) -> List[Message]:
    """Give ``data`` to ``session`` as a driver would (never more than it wants at once)
    and return the messages it makes of them."""
    out: List[Message] = []
    view = memoryview(data)
    while True:
        event = session.next_event()
        if event is not NEED_DATA:
            assert isinstance(event, Message)
            out.append(event)
            continue
        if not view:
            return out
        n = min(session.wanted(), len(view))
        session.receive_data(bytes(view[:n]))
        view = view[n:]


class ConnectionPair:
    def __init__(self) -> None:
        self.source = SourceSession()
        self.target = TargetSession()

    def source_sends(self, *msgs: Message) -> List[Message]:
        """What the target makes of ``msgs`` sent by the source."""
        return feed(self.target, b"".join(self.source.send(m) for m in msgs))

    def target_sends(self, *msgs: Message) -> List[Message]:
        """What the source makes of ``msgs`` sent by the target."""
        return feed(self.source, b"".join(self.target.send(m) for m in msgs))
