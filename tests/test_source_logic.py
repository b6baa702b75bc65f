"""The source agent's per-disk bookkeeping, without sockets: resync progress and estimate."""

from __future__ import annotations

from agent.source import DiskLink
from agent.store import DiskRow

MiB = 1024 * 1024


def link() -> DiskLink:
    return DiskLink(DiskRow("d1", "g", 0, "vda", "/dev/null", 64 * MiB))


def test_no_resync_no_progress() -> None:
    d = link()
    d.update_counters({"inconsistent": 0, "resync_bytes": 0, "dirty_bytes": 0}, 1.0)
    assert d.resync_progress() == {"resync_progress": None, "resync_eta_seconds": None}


def test_progress_and_estimate_follow_the_resync() -> None:
    d = link()
    d.update_counters({"inconsistent": 1, "resync_bytes": 10 * MiB, "dirty_bytes": 40 * MiB},
                      100.0)
    p = d.resync_progress()
    assert p["resync_progress"] == 0.0 and p["resync_eta_seconds"] is None
    d.update_counters({"inconsistent": 1, "resync_bytes": 20 * MiB, "dirty_bytes": 30 * MiB},
                      101.0)  # 10 MiB/s
    p = d.resync_progress()
    assert p["resync_progress"] == 0.25
    assert p["resync_eta_seconds"] == 3.0
    d.update_counters({"inconsistent": 1, "resync_bytes": 40 * MiB, "dirty_bytes": 10 * MiB},
                      102.0)  # 20 MiB/s now, smoothed: 0.7 * 10 + 0.3 * 20 = 13 MiB/s
    p = d.resync_progress()
    assert p["resync_progress"] == 0.75
    assert p["resync_eta_seconds"] == round(10 / 13, 1)
    d.update_counters({"inconsistent": 0, "resync_bytes": 50 * MiB, "dirty_bytes": 0}, 103.0)
    assert d.resync_progress()["resync_progress"] is None


def test_a_new_splitter_restarts_the_count() -> None:
    d = link()
    d.update_counters({"inconsistent": 1, "resync_bytes": 30 * MiB, "dirty_bytes": 10 * MiB},
                      1.0)
    d.update_counters({"inconsistent": 1, "resync_bytes": 1 * MiB, "dirty_bytes": 60 * MiB},
                      2.0)  # counters went back: another generation
    assert d.resync_progress()["resync_progress"] == 0.0
