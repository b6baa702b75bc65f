"""The source role of a group: its disks' change streams, shipped to the target site.

- ``site``: ``SourceSite``, the groups this site protects and the requests on them.
- ``splitters``: starting, stopping and supervising the nbdkit splitters.
"""

from .site import (
    DEFAULT_PORT,
    DEFAULT_QUEUE,
    DEFAULT_SETTINGS,
    NAME_RE,
    DiskLink,
    GroupShipper,
    SourceSite,
    open_session,
    parse_durable,
    parse_target,
    plain_connect,
)

__all__ = ["DEFAULT_PORT", "DEFAULT_QUEUE", "DEFAULT_SETTINGS", "NAME_RE", "DiskLink",
           "GroupShipper", "SourceSite", "open_session", "parse_durable", "parse_target",
           "plain_connect"]
