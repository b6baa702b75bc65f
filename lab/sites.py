"""Agents as processes, for the lab: the demo and the tests run two sites on one machine.

Each ``Site`` is a real ``ferry agent`` process with its own data directory, loopback
replication port and API socket (``unix:DATA/api.sock``), driven through the real ``ferry``
CLI and API, as an administrator would.
"""

from __future__ import annotations

import glob
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from agent.client import Client

REPO = Path(__file__).resolve().parent.parent
FERRY = [sys.executable, "-m", "agent.cli"]


def _ephemeral_range() -> range:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            low, high = (int(x) for x in f.read().split())
        return range(low, high + 1)
    except (OSError, ValueError):
        return range(32768, 61000)


def free_port() -> int:
    """A loopback port free now, below the kernel's ephemeral range when it can be: a port
    from bind(0) is one the kernel also hands to outgoing connections, which can take it
    before the agent binds it."""
    ephemeral = _ephemeral_range()
    rng = random.Random()
    for _ in range(50):
        port = rng.randrange(10000, 30000)
        if port in ephemeral:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PortTaken(RuntimeError):
    """The agent could not bind a port: another process holds it."""


class Site:
    """One ``ferry agent`` process with its own data directory and ports; ``insecure``
    runs it with ``--insecure`` (plain TCP), else sites must be paired (``pair_with``).
    ``image_roots``: the directories the agent may take disks and seeds from (``ferry agent
    --image-root``); by default the directory that holds ``root``, where the lab and the
    benchmarks keep their images."""

    def __init__(self, name: str, root: Path, insecure: bool = True,
                 image_roots: Optional[List[Path]] = None) -> None:
        self.name = name
        self.image_roots = list(image_roots) if image_roots is not None else [root.parent]
        self.insecure = insecure
        self.data = root / name
        self.port = free_port()
        self.api_url = "unix:%s" % (self.data / "api.sock")
        self.address = "127.0.0.1:%d" % self.port
        self.extra_args: List[str] = []  # more ``ferry agent`` options (--metrics, --api)
        self.log = root / ("%s.log" % name)
        self.proc: Optional[subprocess.Popen] = None
        self._started = False  # once it has run, its address is known: it keeps it

    def start(self, timeout: float = 30) -> Site:
        """Start the agent; return once it says it is ready in its own log (not merely once
        something answers on its API port: another process could hold that port). At its
        first start a site whose port another process took meanwhile moves to new ports."""
        for attempt in range(3):
            try:
                return self._start(timeout)
            except PortTaken:
                if self._started or attempt == 2:
                    raise
                self._new_ports()
        raise AssertionError("unreachable")

    def _new_ports(self) -> None:
        self.port = free_port()
        self.address = "127.0.0.1:%d" % self.port

    def _start(self, timeout: float) -> Site:
        readies = self._readies()
        logf = open(self.log, "ab")
        self.proc = subprocess.Popen(
            [*FERRY, "agent", "--data", str(self.data), "--listen", self.address,
             "--api", self.api_url, "--site", self.name,
             *(["--insecure"] if self.insecure else []),
             *[a for r in self.image_roots for a in ("--image-root", str(r))],
             *self.extra_args],
            stdout=logf, stderr=logf, cwd=REPO)
        logf.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                text = self.log.read_text()
                if text.rstrip().endswith("Address already in use"):
                    raise PortTaken("agent %s exited: %s" % (self.name, text))
                raise RuntimeError("agent %s exited: %s" % (self.name, text))
            if self._readies() > readies:
                self._started = True
                return self
            time.sleep(0.05)
        raise RuntimeError("agent %s did not say it was ready in %s s" % (self.name, timeout))

    def _readies(self) -> int:
        try:
            return self.log.read_text(errors="replace").count("ferry agent ready:")
        except FileNotFoundError:
            return 0

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """kill -9: no chance to clean up."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def splitter_pids(self) -> List[int]:
        pids = []
        for path in glob.glob(str(self.data / "run" / "*.pid")):
            try:
                pids.append(int(Path(path).read_text().strip()))
            except (OSError, ValueError):
                pass
        return [p for p in pids if os.path.exists("/proc/%d" % p)]

    def kill_splitters(self, sig: int = signal.SIGKILL) -> None:
        for pid in self.splitter_pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 10
        while self.splitter_pids() and time.monotonic() < deadline:
            time.sleep(0.05)

    def export_pids(self) -> List[int]:
        """The nbdkit processes serving this site's views and live exports (they outlive
        the agent: agent/target/exports.py)."""
        pids = []
        for path in glob.glob(str(self.data / "views" / "*" / "*.pid")):
            try:
                pids.append(int(Path(path).read_text().strip()))
            except (OSError, ValueError):
                pass
        return [p for p in pids if os.path.exists("/proc/%d" % p)]

    def kill_exports(self) -> None:
        for pid in self.export_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def api(self, method: str, path: str, body: Optional[Dict[str, Any]] = None,
            timeout: float = 60) -> Any:
        """The agent's answer (JSON, or text for /metrics); an error raised as its
        ``FerryError``."""
        return Client(self.api_url).call(method, path, body, timeout)

    def ferry(self, *args: str, check: bool = True, timeout: float = 300
              ) -> subprocess.CompletedProcess:
        """Run the ``ferry`` CLI against this site, as a user would."""
        proc = subprocess.run([*FERRY, "--api", self.api_url, *args], cwd=REPO,
                              capture_output=True, text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError("ferry %s failed (%d): %s%s" % (
                " ".join(args), proc.returncode, proc.stdout, proc.stderr))
        return proc

    def pair_with(self, target: Site) -> str:
        """Pair this site with ``target`` as an administrator would; the token used."""
        token = target.ferry("pair-token").stdout.strip()
        self.ferry("pair", target.address, "--token", token)
        return token

    def status(self, group: Optional[str] = None) -> Dict[str, Any]:
        args = ["status", "--json"] + ([group] if group else [])
        result: Dict[str, Any] = json.loads(self.ferry(*args).stdout)
        return result


def protect_images(site: Site, group: str, work: Path, names: List[str], size: int,
                   target: str, *extra: str) -> Dict[str, str]:
    """Make a sparse image ``work/NAME.img`` of ``size`` bytes per name and protect them as
    ``group`` on ``site`` towards ``target``: each disk's NBD URI by name."""
    disks = []
    for name in names:
        path = work / ("%s.img" % name)
        with open(path, "wb") as f:
            f.truncate(size)
        disks.append(path)
    out = site.ferry("protect", group, *[a for d in disks for a in (
        "--disk", "%s=%s" % (d.stem, d))], "--target", target, *extra).stdout
    return dict(line.split("\t") for line in out.strip().splitlines())
