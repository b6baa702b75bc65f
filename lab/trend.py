"""Trends of sampled figures (RSS, fds, threads) over a long run: a leak is a slope that
stays when the warm-up is left out."""

from __future__ import annotations

from typing import Sequence, Tuple


def slope(points: Sequence[Tuple[float, float]]) -> float:
    """Least-squares slope of ``(seconds, value)`` points, per second; 0 for fewer than two
    points or all at one time."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mt = sum(t for t, _ in points) / n
    mv = sum(v for _, v in points) / n
    den = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (v - mv) for t, v in points) / den if den else 0.0
