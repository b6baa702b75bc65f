"""Two agents on this machine, A (source) and B (target), for the end-to-end benchmarks.

    with Pair() as p:
        uris = p.protect("g", [image], "--checkpoint-interval", "1s")
        p.a.ferry("wait", "g", "--synced")

Each site is a real ``ferry agent`` process (``lab.sites.Site``) on loopback, driven
through its CLI and HTTP API. On the way out both agents stop and every splitter is killed,
whatever happened, and the working directory is removed.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.sites import Site


def start_sites(root: Path, tries: int = 3) -> Tuple[Site, Site]:
    """Start site B, then site A, under ``root``. ``Site`` picks free ports before the
    agent binds them, and other work on this machine may take one meanwhile (an API port
    that answers with a Ferry frame, or a bind that fails): then start again, new ports."""
    for attempt in range(tries):
        a, b = Site("A", root), Site("B", root)
        try:
            b.start()
            a.start()
            return a, b
        except (OSError, RuntimeError, http.client.HTTPException):
            for site in (a, b):
                site.stop()
            if attempt == tries - 1:
                raise
    raise AssertionError("unreachable")


class Pair:
    def __init__(self, prefix: str = "fyb") -> None:
        # Unix socket paths are limited to 107 bytes: keep the agents' data short.
        self.root = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
        self.a = Site("A", self.root)
        self.b = Site("B", self.root)

    def __enter__(self) -> Pair:
        self.a, self.b = start_sites(self.root)
        return self

    def __exit__(self, *exc: object) -> None:
        for site in (self.a, self.b):
            site.stop()
            site.kill_splitters()
        shutil.rmtree(self.root, ignore_errors=True)

    def image(self, name: str, size: int) -> Path:
        """A sparse raw image of ``size`` bytes."""
        path = self.root / (name + ".img")
        with open(path, "wb") as f:
            f.truncate(size)
        return path

    def protect(self, group: str, images: List[Path], *extra: str) -> Dict[str, str]:
        """Protect ``images`` as ``group`` (disk names from the file names); NBD URIs."""
        out = self.a.ferry("protect", group, *[a for p in images
                                               for a in ("--disk", "%s=%s" % (p.stem, p))],
                           "--target", self.b.address, *extra).stdout
        return dict(line.split("\t") for line in out.strip().splitlines())

    def checkpoints(self, group: str) -> List[Dict[str, Any]]:
        """The checkpoints site B holds for ``group``."""
        out = json.loads(self.b.ferry("checkpoints", group, "--json").stdout)
        return list(out.get("target") or [])


class Sampler:
    """Calls ``sample()`` every ``period`` seconds in a thread and keeps what it returns
    (with the monotonic time it was taken), until ``stop()``. A failing sample is kept
    as None: the benchmark says how many there were."""

    def __init__(self, sample: Callable[[], Optional[Dict[str, Any]]],
                 period: float) -> None:
        self.sample = sample
        self.period = period
        self.samples: List[Dict[str, Any]] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)

    def start(self) -> Sampler:
        self._thread.start()
        return self

    def stop(self) -> List[Dict[str, Any]]:
        self._stop.set()
        self._thread.join(60)
        return self.samples

    def _run(self) -> None:
        next_at = time.monotonic()
        while not self._stop.is_set():
            try:
                s = self.sample()
            except Exception:  # an agent busy past the timeout: count it, go on
                s = None
            if s is None:
                self.failures += 1
            else:
                self.samples.append(s)
            next_at += self.period
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def fio_command(uri: str, size: int, seconds: float, jobs: List[List[str]],
                *extra: str) -> List[str]:
    """fio over NBD with one ``--name`` per job (its options after it), JSON output."""
    cmd = ["fio", "--ioengine=nbd", "--uri=" + uri, "--size=%d" % size,
           "--runtime=%d" % max(1, round(seconds)), "--time_based", "--output-format=json",
           *extra]
    for i, job in enumerate(jobs):
        cmd += ["--name=job%d" % i, *job]
    return cmd


def run(cmd: List[str], **kwargs: Any) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, check=True, **kwargs)
