"""The source role of a group: its disks' change streams, shipped to the target site.

- ``site``: ``SourceSite``, the groups this site protects and the requests on them.
- ``settings``: group names, the target's address, setting defaults.
- ``splitters``: starting, stopping and supervising the nbdkit splitters (``Fleet``).
- ``intake``: the Unix socket the splitters connect to.
- ``changes``: ``ChangeStream``, what the shipper ships, and ``ChangeSink``, what feeds it.
- ``link``: ``DiskLink``, a splitter's socket as a ``ChangeStream``.
- ``cursor``: one disk's sequence and rewind rules (no I/O).
- ``shipper``: ``GroupShipper``, a group's sessions with the target.
- ``handshake``: opening a session (HELLO, OPEN, OPENED, SEED).
- ``checkpointing``: a group's checkpoints from request to ack (no I/O).
- ``states``: the shipper's and the disks' states, as status shows them.
- ``status``: the status of the groups this site protects.
"""

from .changes import ChangeSink, ChangeStream
from .handshake import open_session, plain_connect, session_stream
from .link import DiskLink
from .settings import DEFAULT_PORT, DEFAULT_QUEUE, DEFAULT_SETTINGS, NAME_RE, parse_target
from .shipper import GroupShipper
from .site import SourceSite

__all__ = [
           "DEFAULT_PORT",
           "DEFAULT_QUEUE",
           "DEFAULT_SETTINGS",
           "NAME_RE",
           "ChangeSink",
           "ChangeStream",
           "DiskLink",
           "GroupShipper",
           "SourceSite",
           "open_session",
           "parse_target",
           "plain_connect",
           "session_stream",
]
