"""``make soak``: random faults under a steady oracle write load, bounded in time.

    SOAK_MINUTES=5 python bench/soak.py      # default 30; SOAK_INTERVAL=30,90 (seconds)
    SOAK_FAULTS=flap_link SOAK_INTERVAL=1,5 ...   # only some faults (names in FAULTS)

Two sites on loopback (real agents, the link through the lab's fault proxy), one group of
two disks written by the oracle writer (lab/oracle.py) all along. Every 30-90 s one fault
from ``FAULTS`` is injected; after it, the soak waits for the group to be synced, runs
``ferry verify`` (a flipped replica byte must be found and is repaired with ``--repair``;
any other difference is a mismatch), and samples each agent's RSS and open fds. At the end
the writer stops and the newest point of both disks is restored and checked by the oracle.
Prints the faults, RSS and fd slopes (per agent process that lived longest; the RSS slope
also over the second half of the run, past warm-up), resyncs,
verify mismatches and the oracle's verdict; exits 1 if the oracle failed or verify found a
difference nobody made.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.oracle import OracleFailure, OracleWriter, check
from lab.proxy import FaultProxy
from lab.sites import Site, protect_images
from lab.trend import slope

MiB = 1024 * 1024
SIZE = 16 * MiB


class Soak:
    proxy: FaultProxy

    def __init__(self, root: Path, work: Path) -> None:
        self.work = work
        self.a = Site("A", root, image_roots=[work])
        self.b = Site("B", root, image_roots=[work])
        self.rng = random.Random(int(os.environ.get("SOAK_SEED", 1)))
        self.samples: List[Tuple[float, str, int, int, int]] = []  # t, site, pid, rss, fds
        self.faults: Dict[str, int] = {}
        self.mismatches = 0
        self.flips_found = 0
        self.expect_flip = False

    # -- faults ------------------------------------------------------------------------

    def kill_b(self) -> None:
        self.b.kill()
        time.sleep(self.rng.uniform(0.5, 3))
        self.b.start()

    def kill_a(self) -> None:
        self.a.kill()
        time.sleep(self.rng.uniform(0.5, 3))
        self.a.start()

    def cut_link(self) -> None:
        self.proxy.cut()
        time.sleep(self.rng.uniform(1, 5))
        self.proxy.heal()

    def flap_link(self) -> None:
        for _ in range(5):
            self.proxy.cut()
            time.sleep(self.rng.uniform(0.2, 1))
            self.proxy.heal()
            time.sleep(self.rng.uniform(1, 5))

    def stall_link(self) -> None:
        self.proxy.stall()
        time.sleep(self.rng.uniform(2, 6))
        self.proxy.heal()

    def slow_link(self) -> None:
        self.proxy.delay(0.05)
        self.proxy.throttle(2_000_000)
        time.sleep(10)
        self.proxy.heal()

    def corrupt_link(self) -> None:
        self.proxy.corrupt(1)
        time.sleep(2)

    def kill_splitter(self) -> None:
        pids = self.a.splitter_pids()
        if pids:
            os.kill(self.rng.choice(pids), signal.SIGKILL)
        time.sleep(3)

    def flip_replica(self) -> None:
        replica = self.b.status()["replicas"]["g1"]["disks"]["vda"]["replica"]
        fd = os.open(replica, os.O_RDWR)
        try:
            offset = self.rng.randrange(SIZE)
            byte = os.pread(fd, 1, offset)
            os.pwrite(fd, bytes([(byte[0] if byte else 0) ^ 0x5A]), offset)
            os.fsync(fd)
        finally:
            os.close(fd)
        self.expect_flip = True

    # kill_splitter is not drawn: the oracle writer is a plain NBD client, which (unlike
    # qemu's, with reconnect-delay) does not reconnect; tests/test_faults.py covers it.
    FAULTS: Tuple[str, ...] = ("kill_b", "kill_a", "cut_link", "flap_link", "stall_link",
                               "slow_link", "corrupt_link", "flip_replica")

    # -- checks --------------------------------------------------------------------------

    def sample(self) -> None:
        now = time.monotonic()
        for site in (self.a, self.b):
            if site.proc is None:
                continue
            pid = site.proc.pid
            try:
                with open("/proc/%d/status" % pid) as f:
                    # RssAnon: the heap; RssFile (mapped files, libraries) is not the agent's
                    rss = next(int(line.split()[1]) for line in f if line.startswith("RssAnon"))
                fds = len(os.listdir("/proc/%d/fd" % pid))
            except (OSError, StopIteration):
                continue
            self.samples.append((now, site.name, pid, rss, fds))

    def settle_and_verify(self) -> None:
        self.a.ferry("wait", "g1", "--synced", "--timeout", "300")
        proc = self.a.ferry("verify", "g1", "--json", "--repair", check=False, timeout=900)
        out = json.loads(proc.stdout) if proc.stdout.strip() else {}
        found = sum(len(d["differing"]) for d in out.get("disks", {}).values())
        if proc.returncode not in (0, 1):
            print("  verify failed: %s" % proc.stderr.strip(), flush=True)
            self.mismatches += 1
        elif found and self.expect_flip:
            self.flips_found += 1
            self.mismatches += found - 1
        else:
            self.mismatches += found
            if self.expect_flip:
                print("  the flipped replica byte was not found (it may have been "
                      "overwritten by a newer write before verify)", flush=True)
        self.expect_flip = False
        if found:
            self.a.ferry("wait", "g1", "--synced", "--timeout", "300")

    def slopes(self) -> Dict[str, Tuple[float, float, float, int, int]]:
        """Per site, over its longest-lived process: (RSS KiB/min, the same over the second
        half of its samples, fds/min, first and last RSS KiB). Warm-up (the journal filling
        its window, the first batches) is in the first figure; a leak is in both."""
        out = {}
        for name in ("A", "B"):
            by_pid: Dict[int, List[Tuple[float, int, int]]] = {}
            for t, site, pid, rss, fds in self.samples:
                if site == name:
                    by_pid.setdefault(pid, []).append((t, rss, fds))
            if not by_pid:
                continue
            s = max(by_pid.values(), key=len)
            late = s[len(s) // 2:]
            out[name] = (slope([(t, r) for t, r, _f in s]) * 60,
                         slope([(t, r) for t, r, _f in late]) * 60,
                         slope([(t, f) for t, _r, f in s]) * 60, s[0][1], s[-1][1])
        return out


def main() -> int:
    minutes = float(os.environ.get("SOAK_MINUTES", 30))
    low, high = (float(x) for x in os.environ.get("SOAK_INTERVAL", "30,90").split(","))
    faults = tuple(os.environ.get("SOAK_FAULTS", ",".join(Soak.FAULTS)).split(","))
    unknown = sorted(set(faults) - set(Soak.FAULTS))
    if unknown:
        print("soak: unknown fault %s (faults: %s)" % (unknown[0], ", ".join(Soak.FAULTS)))
        return 2
    root = Path(tempfile.mkdtemp(prefix="fysoak", dir="/tmp"))
    work = Path(tempfile.mkdtemp(prefix="fysoak-img"))
    soak = Soak(root, work)
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print("soak: %.1f min, a fault every %g-%g s, started %s" % (minutes, low, high, started),
          flush=True)
    writer = None
    try:
        soak.b.start()
        soak.a.start()
        host, port = soak.b.address.rsplit(":", 1)
        with FaultProxy((host, int(port))) as proxy:
            soak.proxy = proxy
            uris = protect_images(soak.a, "g1", work, ["vda", "vdb"], SIZE, proxy.address,
                                  "--history", "60s")
            soak.a.ferry("wait", "g1", "--synced", "--timeout", "120")
            writer = OracleWriter(uris, SIZE, seed=3, blocks=2048, pause=0.005)
            writer.start()
            end = time.monotonic() + minutes * 60
            soak.sample()
            while True:
                pause = soak.rng.uniform(low, high)
                if time.monotonic() + pause > end:
                    break
                _sleep_sampling(soak, pause)
                fault = soak.rng.choice(faults)
                t = time.monotonic()
                getattr(soak, fault)()
                soak.faults[fault] = soak.faults.get(fault, 0) + 1
                soak.settle_and_verify()
                soak.sample()
                print("  %6.0f s  %-13s  writes %7d  recovered in %.1f s" % (
                    minutes * 60 - (end - time.monotonic()), fault, writer.log.acked,
                    time.monotonic() - t), flush=True)
                if writer.errors:
                    break
            _sleep_sampling(soak, max(0.0, end - time.monotonic()))
            barrier = writer.finish()
            soak.a.ferry("wait", "g1", "--synced", "--timeout", "300")
            images = {}
            for name in ("vda", "vdb"):
                dest = work / ("restored-%s.img" % name)
                soak.b.ferry("restore", "g1", "--disk", name, "--to", str(dest))
                images[name] = str(dest)
            try:
                verdict = check(images, writer.log, barrier)
                oracle = "passed: the newest point holds all %d acked writes (prefix %d)" % (
                    writer.log.acked, verdict.prefix)
                ok = verdict.prefix == writer.log.acked
            except OracleFailure as e:
                oracle, ok = "FAILED: %s" % e, False
            events = soak.a.ferry("events", "--json").stdout.splitlines()
            resyncs = sum(1 for e in map(json.loads, events)
                          if e.get("kind") == "resync" and e.get("change") == "start")
            print("soak: %s faults: %s" % (sum(soak.faults.values()), ", ".join(
                "%s x%d" % kv for kv in sorted(soak.faults.items())) or "none"))
            for name, (rss, late, fds, first, last) in soak.slopes().items():
                print("soak: agent %s: RSS (anonymous) slope %+.0f KiB/min, %+.0f KiB/min over "
                      "the second half (%d -> %d KiB), fd slope %+.2f/min"
                      % (name, rss, late, first, last, fds))
            print("soak: resyncs started %d; verify: %d flipped byte(s) found and repaired, "
                  "%d unexpected mismatch(es)" % (resyncs, soak.flips_found, soak.mismatches))
            print("soak: oracle %s; writer errors: %d" % (oracle, len(writer.errors)))
            return 0 if ok and not soak.mismatches and not writer.errors else 1
    finally:
        if writer is not None:
            writer.close()
        for site in (soak.a, soak.b):
            site.stop()
            site.kill_splitters()
            site.kill_exports()
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)


def _sleep_sampling(soak: Soak, seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(min(5.0, max(0.0, end - time.monotonic())))
        soak.sample()


if __name__ == "__main__":
    sys.exit(main())

