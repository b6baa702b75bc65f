"""Clock skew between the sites: site A's agent runs under libfaketime, its wall clock
hours ahead of or behind site B's (the kernel's clock and both monotonic clocks untouched).

Site B's history covered, its retention and RPO must be right whatever A's wall clock says;
``--at`` names a time in A's clock (checkpoints carry A's wall time: "as the VM saw it")."""

from __future__ import annotations

import datetime
import json
import os
import time
from pathlib import Path
from typing import List, Optional

import pytest
from conftest import Lab
from test_faults import wait_for

from lab.oracle import OracleWriter

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

MiB = 1024 * 1024
FAKETIME = "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1"  # Debian's faketime
HOURS = 3


def start_skewed(lab: Lab, hours: int) -> None:
    """Start site A's agent with its wall clock ``hours`` off (libfaketime); its splitters
    (nbdkit) keep the real one."""
    if not os.path.exists(FAKETIME):
        pytest.skip("libfaketime is not installed (Debian package faketime)")
    env = {"LD_PRELOAD": FAKETIME, "FAKETIME": "%+dh" % hours,
           "FAKETIME_DONT_FAKE_MONOTONIC": "1", "FAKETIME_SKIP_CMDS": "nbdkit",
           # time.sleep that works under libfaketime (see the module there)
           "PYTHONPATH": str(Path(__file__).parent / "faketime")}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # inherited by the agent's process only: started here
    try:
        lab.a.start()
    finally:
        for k, v in saved.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def iso(wall_ns: int) -> str:
    """ISO 8601 to the microsecond, rounded up: the time is at or after ``wall_ns``."""
    us = -(-wall_ns // 1000)
    t = datetime.datetime.fromtimestamp(us // 10**6, datetime.timezone.utc)
    return t.replace(microsecond=us % 10**6).isoformat()


@pytest.mark.parametrize("hours", [HOURS, -HOURS])
def test_site_b_is_right_with_site_a_hours_off(lab: Lab, hours: int) -> None:
    lab.b.start()
    start_skewed(lab, hours)
    disk = lab.image("vda.img", 8 * MiB)
    started = time.monotonic()
    uris = lab.protect("g1", disk, extra=("--history", "4s"))
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 8 * MiB, seed=5, blocks=512, pause=0.005)
    writer.start()
    try:
        # Retention is site B's clock against its own files: checkpoints leave the 4 s
        # window (their segments are applied to the replica).
        first = wait_oldest(lab, None)
        wait_oldest(lab, first)
        lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
        elapsed = time.monotonic() - started
        r = lab.b.status("g1")["replicas"]["g1"]
        g = lab.a.status("g1")["groups"]["g1"]
        chosen = at_newest(lab)
    finally:
        writer.finish()
    newest = r["newest_checkpoint"]
    skew = newest["wall_ns"] / 1e9 - time.time()
    # The skew is real: the checkpoints site B holds carry A's wall time, hours off B's.
    assert abs(skew - hours * 3600) < 60, skew
    # History covered: what the journal holds, in seconds, not hours (nor negative).
    assert 0 < r["history_covered_s"] <= elapsed + 5, (r["history_covered_s"], elapsed)
    # RPO is measured on site A from the splitter's monotonic clock.
    assert 0 <= g["rpo_seconds"] < 30, g["rpo_seconds"]
    print("\nclock skew %+d h: A's checkpoints %+.0f s off B's clock; B covers %.1f s of "
          "history (window 4 s, test ran %.1f s); RPO %.2f s; --at chose %s" % (
              hours, skew, r["history_covered_s"], elapsed, g["rpo_seconds"], chosen))


def wait_oldest(lab: Lab, other: Optional[str]) -> str:
    """The id of site B's oldest checkpoint once there is one other than ``other``."""
    found: List[str] = []

    def oldest() -> bool:
        c = lab.b.status("g1")["replicas"]["g1"]["oldest_checkpoint"]
        found[:] = [c["id"]] if c else []
        return bool(found) and found[0] != other
    wait_for(oldest, timeout=60, what="a checkpoint to leave the 4 s window" if other
             else "a checkpoint on site B")
    return found[0]


def at_newest(lab: Lab) -> str:
    """``--at`` names a time in A's clock: the newest checkpoint's own wall time chooses it
    (asked again if it left the 4 s window before the restore)."""
    for _ in range(5):
        held = json.loads(lab.b.ferry("checkpoints", "g1", "--json").stdout)["target"]
        chosen = held[-1]
        proc = lab.b.ferry("restore", "g1", "--disk", "vda", "--to", str(lab.work / "at.img"),
                           "--at", iso(chosen["wall_ns"]), "--json", check=False)
        if proc.returncode == 0:
            assert json.loads(proc.stdout)["checkpoint"]["id"] == chosen["id"], proc.stdout
            return str(chosen["id"])
        assert "no checkpoint at or before" in proc.stderr, proc.stderr
        (lab.work / "at.img").unlink(missing_ok=True)
    raise AssertionError("--at never found the newest checkpoint")


def test_history_covered_counts_site_b_time_since_the_newest_checkpoint() -> None:
    """``status.covered``: the checkpoints' span in A's clock plus B's monotonic time since
    the newest arrived, whatever A's wall clock is; a snapshot keeps the arrival time of a
    newest checkpoint it already had."""
    from agent.target import status

    a = 10**18 + 3 * 3600 * 10**9  # A's wall clock, 3 h ahead of anything on B
    snap = {"oldest_checkpoint": {"id": "c1", "wall_ns": a},
            "newest_checkpoint": {"id": "c9", "wall_ns": a + 30 * 10**9},
            status.RECEIVED: 1000.0}
    assert status.covered(snap, 1000.0) == 30.0
    assert status.covered(snap, 1012.5) == 42.5
    assert status.covered(dict(snap, oldest_checkpoint=None), 1012.5) == 0.0
    assert status.covered(snap, 999.0) == 30.0  # never less than the span
    prev = dict(snap)
    assert status.received_at(prev, "c9", 2000.0) == 1000.0  # the same newest: kept
    assert status.received_at(prev, "c10", 2000.0) == 2000.0  # a new newest: now
    assert status.received_at({}, "c9", 2000.0) == 2000.0  # B's first snapshot
    assert status.received_at(prev, None, 2000.0) == 2000.0
