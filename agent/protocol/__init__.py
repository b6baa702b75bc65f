"""The site-to-site replication protocol.

- ``frames``: the frame header, the codec (msgpack, zstd, checksum) and field checks.
- ``batch``: BATCH bodies, a group's change records on the wire.
- ``messages``: every message type, parsed and validated once.
- ``session``: ``SourceSession`` and ``TargetSession``, the protocol's state machines, fed
  frames and events, doing no I/O.
- ``cursor``: the per-disk sequence rules (what is next, a duplicate, a gap).
- ``stream``: the trio code that moves frames between a socket and a session.
"""
