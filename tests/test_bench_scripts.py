"""The benchmarks' scripts run from ``bench/``, which Python puts first on the path: a script
named like one of Ferry's packages hides it from every benchmark that imports it (a
``bench/formats.py`` once broke ``changelog_micro.py``, ``pit_view.py`` and, through the
agent's imports, anything else that reached the package ``formats``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"


def packages() -> set:
    return {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}


def test_no_bench_script_is_named_like_a_package():
    assert {"agent", "nbd_plugin", "formats", "lab"} <= packages()
    clashes = sorted(p.name for p in BENCH.glob("*.py") if p.stem in packages())
    assert clashes == []


@pytest.mark.parametrize("script", ["changelog_micro.py", "pit_view.py", "target_write.py"])
def test_scripts_that_import_formats_start(script):
    out = subprocess.run([sys.executable, str(BENCH / script), "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "usage:" in out.stdout
