"""Sizes, durations and times: parsed from the command line, and printed."""

from __future__ import annotations

import re

import click

SIZE_RE = re.compile(r"^(\d+)([KMGT]?)(i?B)?$", re.I)
DURATION_RE = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_size(text: str) -> int:
    m = SIZE_RE.match(text.strip())
    if not m:
        raise click.BadParameter("%r is not a size like 512M or 2G" % text)
    return int(m.group(1)) * 1024 ** " KMGT".index((m.group(2) or " ").upper())


def parse_duration(text: str) -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``4h`` or ``2d``."""
    m = DURATION_RE.match(text.strip())
    if not m:
        raise click.BadParameter("%r is not a duration like 30s, 15m or 4h" % text)
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def parse_time(text: str) -> int:
    """Nanoseconds since the epoch from an ISO 8601 time (no zone: this host's local time)."""
    import datetime
    try:
        t = datetime.datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise click.BadParameter("%r is not an ISO 8601 time like 2026-11-23T05:40:00Z"
                                 % text) from None
    return int(t.timestamp() * 1e9)


def iso(wall_ns: int) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(wall_ns / 1e9, datetime.timezone.utc).isoformat(
        timespec="milliseconds").replace("+00:00", "Z")


def duration(seconds: float) -> str:
    seconds = int(seconds)
    if seconds < 60:
        return "%d s" % seconds
    if seconds < 3600:
        return "%d min %02d s" % divmod(seconds, 60)
    return "%d h %02d min" % (seconds // 3600, seconds % 3600 // 60)


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return ("%d %s" % (n, unit)) if unit == "B" else ("%.1f %s" % (n, unit))
        n /= 1024
    return str(n)
