"""What a protected group is configured by: names, the target's address, setting defaults."""

from __future__ import annotations

import re
from typing import Any, Dict, Tuple

from ..errors import Invalid

DEFAULT_PORT = 4005
DEFAULT_QUEUE = 256 * 1024 * 1024
DEFAULT_SETTINGS: Dict[str, Any] = {
    "history_s": 4 * 3600,              # the target keeps this much history
    "journal_max": 50 * 1024 ** 3,      # and at most this many journal bytes
    "checkpoint_interval": 1.0,         # automatic checkpoints (0: none)
    "bandwidth": 0,                     # bytes/s the link may carry (0: no limit)
    "stall_timeout": 15.0,              # a link that moves nothing this long while data
                                        # is owed is dropped and reconnected
    "splitter_threads": 16,             # requests each splitter serves at once (nbdkit
                                        # --threads; qemu sends up to 16)
    "replica_format": "raw",            # site B keeps the replicas as raw, qcow2 or vmdk
}
# A group's or a disk's name. Anchored with \A and \Z, not ^ and $: ``$`` also matches before
# a trailing newline, so ``NAME_RE.match("g\n")`` passed. Prefer ``NAME_RE.fullmatch``.
NAME_RE = re.compile(r"\A[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


def parse_target(text: str) -> Tuple[str, int]:
    m = re.fullmatch(r"\[([^\]]+)\](?::(\d+))?", text) or re.fullmatch(r"([^:]+)(?::(\d+))?", text)
    if not m:
        raise Invalid("target %r is not HOST:PORT" % text)
    port = int(m.group(2)) if m.group(2) else DEFAULT_PORT
    if not 0 < port < 65536:
        raise Invalid("target port %d is out of range" % port)
    return m.group(1), port
