"""How many connections that have not authenticated yet this site holds: a bound overall and
one per source address, so a stranger (or a flood of half-open connections) costs a fixed,
small budget and cannot take every slot (docs/security.md).

A connection takes a ``Ticket`` when it is accepted (``Gate.enter``; None: over a bound, close
it at once) and gives it back when it has authenticated (a paired certificate checked and
HELLO accepted) or when it ends, whichever comes first; giving back twice is harmless. No
I/O here: the accept loop (``server.py``) does the closing, and the handshake's time bound.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Optional

MAX_UNAUTHENTICATED = 128       # connections not yet authenticated, over all addresses
MAX_UNAUTHENTICATED_PER_ADDRESS = 32


@dataclass
class Ticket:
    gate: Gate
    address: str
    held: bool = True

    def release(self) -> None:
        """This connection authenticated or ended: its slot is free (once)."""
        if self.held:
            self.held = False
            self.gate._leave(self.address)


@dataclass
class Gate:
    total: int = MAX_UNAUTHENTICATED
    per_address: int = MAX_UNAUTHENTICATED_PER_ADDRESS
    held: Dict[str, int] = field(default_factory=dict)
    count: int = 0
    refused: int = 0        # connections closed at once, over a bound (since the start)
    admitted: int = 0

    def enter(self, address: str) -> Optional[Ticket]:
        """A slot for a new connection from ``address``, or None when a bound is reached."""
        if self.count >= self.total or self.held.get(address, 0) >= self.per_address:
            self.refused += 1
            return None
        self.count += 1
        self.admitted += 1
        self.held[address] = self.held.get(address, 0) + 1
        return Ticket(self, address)

    def _leave(self, address: str) -> None:
        self.count -= 1
        left = self.held[address] - 1
        if left:
            self.held[address] = left
        else:
            del self.held[address]

    def statistics(self) -> Dict[str, int]:
        return {"unauthenticated": self.count, "addresses": len(self.held),
                "refused": self.refused, "admitted": self.admitted,
                "max_unauthenticated": self.total,
                "max_unauthenticated_per_address": self.per_address}
