"""The link's bandwidth limit, on trio's mock clock (pytest-trio's ``autojump_clock``)."""

from __future__ import annotations

import pytest
import trio

from agent.throttle import TokenBucket

MB = 1_000_000


async def send(bucket: TokenBucket, frames: int, size: int) -> float:
    start = trio.current_time()
    for _ in range(frames):
        await bucket.take(size)
    return trio.current_time() - start


async def test_no_limit_never_waits(autojump_clock) -> None:
    assert await send(TokenBucket(0), 1000, MB) == 0


async def test_the_average_rate_holds(autojump_clock) -> None:
    bucket = TokenBucket(10 * MB)
    spent = await send(bucket, 100, 1 * MB)  # 100 MB at 10 MB/s
    assert 9.5 <= spent <= 10.1


async def test_frames_larger_than_the_burst_pass_and_the_average_holds(autojump_clock) -> None:
    bucket = TokenBucket(1 * MB)  # burst 250 kB
    spent = await send(bucket, 10, 4 * MB)  # 40 MB at 1 MB/s
    assert 35 <= spent <= 40.5


async def test_the_rate_changes_while_running(autojump_clock) -> None:
    bucket = TokenBucket(1 * MB)
    slow = await send(bucket, 10, MB // 2)
    bucket.set_rate(10 * MB)
    fast = await send(bucket, 10, MB // 2)
    assert slow > 4 * fast
    bucket.set_rate(0)
    assert await send(bucket, 100, MB) == 0


def test_a_negative_rate_is_refused() -> None:
    with pytest.raises(ValueError):
        TokenBucket(-1)
