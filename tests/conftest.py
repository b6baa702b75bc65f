"""Fixtures: real ``ferry agent`` processes (two sites on loopback), real nbdkit splitters."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator

import pytest

from lab.sites import REPO, Site

LAB_CACHE = REPO / ".cache" / "lab"


class Lab:
    """Two sites, A (source) and B (target), and helpers for a protected disk."""

    def __init__(self, root: Path, work: Path, insecure: bool = True) -> None:
        self.root = root
        self.work = work
        # Disks, seeds and restores live in the test's own tmp directory: the agents'
        # image root (a disk anywhere else is refused, as on a host).
        self.a = Site("A", root, insecure, image_roots=[work])
        self.b = Site("B", root, insecure, image_roots=[work])

    def image(self, name: str, size: int = 64 * 1024 * 1024) -> Path:
        path = self.work / name
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def protect(self, group: str, *disks: Path, extra: tuple = ()) -> Dict[str, str]:
        out = self.a.ferry("protect", group, *[a for d in disks
                                               for a in ("--disk", "%s=%s" % (d.stem, d))],
                           "--target", self.b.address, *extra).stdout
        uris = dict(line.split("\t") for line in out.strip().splitlines())
        return uris

    def restore(self, group: str, disk: str) -> Path:
        dest = self.work / ("restored-%s-%s.img" % (group, disk))
        if dest.exists():
            dest.unlink()
        self.b.ferry("restore", group, "--disk", disk, "--to", str(dest))
        return dest

    def close(self) -> None:
        for site in (self.a, self.b):
            site.stop()
            site.kill_splitters(signal.SIGKILL)
            site.kill_exports()


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    """Two sites with ``--insecure`` (plain TCP): most tests are about other things."""
    yield from _lab(tmp_path, True)


@pytest.fixture
def tls_lab(tmp_path: Path) -> Iterator[Lab]:
    """Two sites that speak only TLS (not yet paired, not started)."""
    yield from _lab(tmp_path, False)


def _lab(tmp_path: Path, insecure: bool) -> Iterator[Lab]:
    # Unix socket paths are limited to 107 bytes: keep the agents' data short.
    root = Path(tempfile.mkdtemp(prefix="fy", dir="/tmp"))
    lab = Lab(root, tmp_path, insecure)
    try:
        yield lab
    finally:
        lab.close()
        for site in (lab.a, lab.b):
            if site.log.exists():
                sys.stderr.write("---- agent %s log (tail) ----\n" % site.name)
                sys.stderr.write("".join(site.log.read_text().splitlines(True)[-40:]))
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def sites(lab: Lab) -> Lab:
    lab.b.start()
    lab.a.start()
    return lab


def samples(text: str) -> Dict[tuple, float]:
    """Prometheus text parsed by ``prometheus_client.parser``: {(name, ((label, value),
    ...)): value}, labels sorted."""
    from prometheus_client.parser import text_string_to_metric_families
    out: Dict[tuple, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def same_bytes(a: Path, b: Path) -> bool:
    return subprocess.run(["cmp", "-s", str(a), str(b)]).returncode == 0


def first_difference(a: Path, b: Path) -> str:
    proc = subprocess.run(["cmp", str(a), str(b)], capture_output=True, text=True)
    return proc.stdout + proc.stderr


@pytest.fixture(autouse=True)
def _no_stray_exports(tmp_path: Path) -> Iterator[None]:
    """Exports outlive the agent that starts them (agent/target/exports.py): a test that
    starts views without a lab (or fails half-way) must not leave nbdkit serving its files.
    Kills, after each test, every nbdkit whose command line names the test's directory."""
    yield
    mark = str(tmp_path).encode()
    for pid_dir in Path("/proc").iterdir():
        if not pid_dir.name.isdigit():
            continue
        try:
            cmd = (pid_dir / "cmdline").read_bytes()
        except OSError:
            continue
        if cmd.startswith(b"/usr/bin/nbdkit") or b"nbdkit\0" in cmd[:64]:
            if mark in cmd:
                try:
                    os.kill(int(pid_dir.name), signal.SIGKILL)
                except OSError:
                    pass
