"""A bandwidth limit for a link: a token bucket, changeable while it runs.

Theory of operation: the bucket fills at ``rate`` bytes per second up to ``burst`` bytes
(by default a quarter of a second's worth). Sending ``n`` bytes takes ``n`` tokens; when
there are not enough, the sender sleeps until there are. A frame larger than the burst
is let through once the bucket is full and leaves it in debt, so any frame size works and
the average still holds. A rate of 0 means no limit. The limit slows shipping only: the
splitters' queues and dirty maps absorb the difference, never the VM.

The clock is trio's, so tests drive it with ``trio.testing.MockClock``.
"""

from __future__ import annotations

from typing import Optional

import trio


class TokenBucket:
    def __init__(self, rate: float = 0.0, burst: Optional[float] = None) -> None:
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp: Optional[float] = None
        self._fixed_burst = burst
        self.set_rate(rate)

    @property
    def rate(self) -> float:
        return self._rate

    def set_rate(self, rate: float) -> None:
        """Change the limit at once (bytes per second; 0: none)."""
        if rate < 0:
            raise ValueError("a bandwidth limit cannot be negative")
        self._refill()
        self._rate = float(rate)
        self._burst = self._fixed_burst if self._fixed_burst is not None else rate / 4
        self._tokens = min(self._tokens, self._burst)

    def _refill(self) -> None:
        try:
            now = trio.current_time()
        except RuntimeError:  # not in trio (configured before the loop runs)
            return
        if self._stamp is not None and self._rate:
            self._tokens = min(self._burst, self._tokens + (now - self._stamp) * self._rate)
        self._stamp = now

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes may go on the link under the current limit."""
        while True:
            self._refill()
            if not self._rate:
                return
            need = min(float(n), self._burst)
            if self._tokens >= need - 1.0:  # a byte of slack: floats never quite get there
                self._tokens -= n  # may go negative: a large frame borrows from later
                return
            # At least a millisecond: a sleep too short to move the clock would spin.
            await trio.sleep(max((need - self._tokens) / self._rate, 0.001))
