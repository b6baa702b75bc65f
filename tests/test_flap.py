"""``make flap``'s short form: the link between the sites cut for 0.2-2 s every 0.5-2 s for
10 s while the oracle writer and fio write (``bench/flap.py``); no writer sees an error, and
site B's newest point holds every acknowledged write of both disks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import flap

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)


def test_link_flapping_under_two_writers(tmp_path: Path) -> None:
    out = flap.run(10, tmp_path, seed=2, up_s=(0.5, 2))
    flap.report(out)
    assert out.ok, out.problems
    assert out.cuts >= 2, "the link was hardly cut"
    assert out.connections >= 2, "the source never connected again after a cut"
    assert out.oracle_acked > 0 and out.fio_writes > 0 and out.vdb_same
