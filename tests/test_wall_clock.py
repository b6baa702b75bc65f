"""Checkpoints' wall times keep the order of their monotonic instants (``--at`` chooses by
them), whatever the wall clock does between two reads."""

from __future__ import annotations

import time

import pytest

from agent.source import checkpointing
from agent.source.checkpointing import WallClock


def test_wall_times_follow_the_monotonic_clock() -> None:
    clock = WallClock()
    now = time.monotonic_ns()
    wall = clock.wall_ns(now)
    assert abs(wall - time.time_ns()) < 50 * 10**6  # the wall clock, within 50 ms
    assert clock.wall_ns(now + 1000) == wall + 1000  # one offset: differences kept


def test_wall_times_keep_their_order_when_the_wall_clock_steps_back(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = WallClock()
    mono = time.monotonic_ns()
    first = clock.wall_ns(mono)
    # A minute later the offset is read again, and the wall clock has been set back 5 s.
    real = time.time_ns
    monkeypatch.setattr(checkpointing.time, "time_ns", lambda: real() - 5 * 10**9)
    clock._read_at = mono - checkpointing.CLOCK_OFFSET_TTL - 1
    later = clock.wall_ns(mono + 10)
    assert later > first  # never dated before an earlier checkpoint
    assert clock.wall_ns(mono + 20) > later
