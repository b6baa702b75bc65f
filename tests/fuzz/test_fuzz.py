"""The fuzz targets in ``make test``: every kept seed (``seeds/``, once-crashing inputs)
and a short mutation run of each target, 0 crashes. ``make fuzz`` runs the long one."""

from __future__ import annotations

import pytest
from fuzzing import TARGETS, run, target_http

SHORT = 3000  # inputs per target here (make fuzz: 1,000,000 in all)


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_a_short_fuzz_run_does_not_crash(target: str) -> None:
    n, crashes = run(target, SHORT, seed=7, keep_crashes=False)
    assert n >= SHORT and crashes == [], crashes


def test_a_crash_is_caught_and_named() -> None:
    """The harness itself: an input that breaks a target's promise is reported."""
    import fuzzing

    def broken(data: bytes) -> None:
        if data.startswith(b"{"):
            raise KeyError("boom")
        target_http(data)

    saved = fuzzing.TARGETS["http"]
    fuzzing.TARGETS["http"] = (broken, saved[1])
    try:
        _n, crashes = run("http", 10, seed=1, keep_crashes=False)
    finally:
        fuzzing.TARGETS["http"] = saved
    assert crashes and "KeyError" in crashes[0] and crashes[0].startswith("http-"), crashes
