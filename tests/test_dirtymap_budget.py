"""The dirty map's memory stays within its budget under the worst write pattern: random
4 KiB writes all over a large sparse disk, during an outage that never ends."""

from __future__ import annotations

import random
import tracemalloc

import pytest

from nbd_plugin.dirtymap import RANGE_COST, DirtyMap

KiB, MiB, TiB = 1024, 1024 * 1024, 1024 ** 4


@pytest.mark.parametrize("budget", [256 * KiB, 2 * MiB])
def test_memory_stays_within_the_budget(budget: int) -> None:
    rng = random.Random(budget)
    tracemalloc.start()
    try:
        m = DirtyMap.for_budget(budget)
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        for _ in range(4 * budget // RANGE_COST):
            m.add(rng.randrange(0, 4 * TiB // 4096) * 4096, 4096)
        current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert len(m) <= m.max_ranges
    assert m.coarsened_bytes > 0, "the pattern must have forced the map to lose detail"
    assert peak - base <= budget, "peak %d bytes over a budget of %d" % (peak - base, budget)
    assert current - base <= budget


def test_what_lost_detail_costs_is_counted() -> None:
    m = DirtyMap(max_ranges=4)
    for block in (2, 5, 9, 14, 20):
        m.add(block * 4096, 4096)
    assert len(m) <= 4
    exact = 5 * 4096
    assert m.bytes == exact + m.coarsened_bytes
    assert m.coarsened_bytes > 0
