"""``unprotect`` removes every file the protection made (issue 18): 30 protect/unprotect
cycles of one group leave site A's data directory as it was before the first, and site B's
as it was after the first (B keeps the replica of an unprotected group, one per group)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Set

import pytest
from conftest import Lab

MiB = 1 << 20
CYCLES = 30


def files(root: Path) -> Set[str]:
    """Every file under ``root``, relative, without the agent's own churn (its database's
    journal files and the API socket come and go with the agent, not with a group)."""
    out = set()
    for top, _dirs, names in os.walk(root):
        for name in names:
            rel = os.path.relpath(os.path.join(top, name), root)
            if not rel.startswith("ferry.db-"):
                out.add(rel)
    return out


def test_protect_unprotect_cycles_leave_nothing_behind(sites: Lab) -> None:
    disk = sites.image("vda.img", 4 * MiB)
    with open(disk, "r+b") as f:
        f.write(os.urandom(MiB))
    a_before = files(sites.a.data)
    b_after_first: Set[str] = set()
    for cycle in range(CYCLES):
        sites.protect("g1", disk)
        sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
        made = files(sites.a.data) - a_before
        assert any(p.endswith(".state.json") for p in made), made  # the protection's files
        sites.a.ferry("unprotect", "g1")
        assert files(sites.a.data) == a_before, (cycle, files(sites.a.data) ^ a_before)
        if cycle == 0:
            b_after_first = files(sites.b.data)
        else:
            assert files(sites.b.data) == b_after_first, (
                cycle, files(sites.b.data) ^ b_after_first)
    assert not sites.a.splitter_pids()


def test_a_group_whose_splitter_cannot_start_leaves_nothing(tmp_path: Path) -> None:
    from agent.source.splitters import Fleet, SplitterError
    from agent.store import DiskRow, GroupRow
    data = tmp_path / "data"
    data.mkdir()
    good = tmp_path / "good.img"
    with open(good, "wb") as f:
        f.truncate(MiB)
    disks = [DiskRow("aaaaaaaaaaaa", "g", 0, "vda", str(good), MiB),
             DiskRow("bbbbbbbbbbbb", "g", 1, "vdb", str(tmp_path / "gone.img"), MiB)]
    fleet = Fleet(str(data), str(data / "splitter.sock"))
    with pytest.raises(SplitterError, match=r"gone\.img"):
        fleet.start_all(GroupRow("g", "127.0.0.1:1", "p", MiB, 0.0, disks, {}))
    assert files(data) == set(), files(data)
    assert fleet.dead(GroupRow("g", "127.0.0.1:1", "p", MiB, 0.0, disks, {})) == disks
