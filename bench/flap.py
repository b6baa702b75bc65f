"""``make flap``: the link between the sites cut and restored every few seconds while two
writers write, then the replica checked against the source.

    python bench/flap.py              # 5 minutes of flapping (FLAP_MINUTES=N for another)
    python bench/flap.py --quick      # 10 s, a cut every 0.5-2 s (a CI test: tests/test_flap.py)

Two real agents on loopback, the link through the lab's fault proxy (``lab/proxy.py``), one
group of two disks: ``vda`` written by the oracle writer (``lab/oracle.py``, one write at a
time, a flush barrier every 20), ``vdb`` by fio (``--ioengine=nbd``, random 4 KiB writes at
a capped rate) through the splitters' NBD exports. The proxy cuts every connection and
refuses new ones for 0.2-2 s, then lets the link up for 1-5 s, over and over. The agents'
RSS, open fds and threads are sampled every second. At the end the writers stop, the group
is waited on until synced, and site B restores its newest point of both disks: ``vda`` must
pass the oracle with every acknowledged write, ``vdb`` must equal the source's file byte for
byte. Prints the cuts, reconnections, the first and last samples and their slopes; exits 1
if a writer saw an error, the oracle failed or ``vdb`` differs.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lab.oracle import OracleFailure, OracleWriter, check
from lab.proxy import FaultProxy
from lab.sites import Site, protect_images
from lab.trend import slope

MiB = 1024 * 1024
SIZE = 32 * MiB
Sample = Tuple[float, int, int, int]  # t, RSS KiB, fds, threads


@dataclass
class Outcome:
    seconds: float
    cuts: int = 0
    connections: int = 0
    oracle_acked: int = 0
    oracle: str = ""
    fio_writes: int = 0
    fio_errors: str = ""
    vdb_same: bool = False
    samples: Dict[str, List[Sample]] = field(default_factory=dict)
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def slopes(self, site: str) -> Tuple[float, float, float]:
        """RSS KiB/min, fds/min, threads/min over the second half of the run (the first
        half is warm-up: site B's journal grows over its history window)."""
        s = self.samples.get(site, [])
        s = s[len(s) // 2:]
        return tuple(slope([(x[0], x[i]) for x in s]) * 60 for i in (1, 2, 3))  # type: ignore


def sample(site: Site) -> Optional[Sample]:
    if site.proc is None:
        return None
    pid = site.proc.pid
    try:
        with open("/proc/%d/status" % pid) as f:
            fields = dict(line.split(":", 1) for line in f)
        return (time.monotonic(), int(fields["VmRSS"].split()[0]),
                len(os.listdir("/proc/%d/fd" % pid)), int(fields["Threads"]))
    except (OSError, KeyError, ValueError):
        return None


def run(seconds: float, work: Path, seed: int = 1, up_s: Tuple[float, float] = (1, 5),
        down_s: Tuple[float, float] = (0.2, 2)) -> Outcome:
    """Flap the link for ``seconds`` under the two writers (see the module): up for
    ``up_s`` seconds, cut for ``down_s`` (uniform draws); ``work`` is an empty directory for
    the sites and the images."""
    rng = random.Random(seed)
    out = Outcome(seconds)
    (work / "sites").mkdir(exist_ok=True)
    a = Site("A", work / "sites", image_roots=[work])
    b = Site("B", work / "sites", image_roots=[work])
    writer: Optional[OracleWriter] = None
    fio: Optional[subprocess.Popen] = None
    try:
        b.start()
        a.start()
        host, port = b.address.rsplit(":", 1)
        with FaultProxy((host, int(port))) as proxy:
            uris = protect_images(a, "g1", work, ["vda", "vdb"], SIZE, proxy.address)
            a.ferry("wait", "g1", "--synced", "--timeout", "120")
            writer = OracleWriter({"vda": uris["vda"]}, SIZE, seed=seed, blocks=2048,
                                  pause=0.005)
            fio = subprocess.Popen(
                ["fio", "--name=flap", "--ioengine=nbd", "--uri=" + uris["vdb"],
                 "--rw=randwrite", "--bs=4k", "--iodepth=4", "--size=%d" % SIZE,
                 "--time_based", "--runtime=%d" % max(1, round(seconds)),
                 "--rate_iops=400", "--randseed=%d" % seed, "--output-format=json"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            writer.start()
            end = time.monotonic() + seconds
            up = True
            while time.monotonic() < end:
                hold = rng.uniform(*up_s) if up else rng.uniform(*down_s)
                stop = min(end, time.monotonic() + hold)
                while time.monotonic() < stop:
                    for site in (a, b):
                        s = sample(site)
                        if s is not None:
                            out.samples.setdefault(site.name, []).append(s)
                    time.sleep(min(1.0, max(0.0, stop - time.monotonic())))
                if time.monotonic() >= end:
                    break
                if up:
                    proxy.cut()
                    out.cuts += 1
                else:
                    proxy.heal()
                up = not up
            proxy.heal()
            fio_out, fio_err = fio.communicate(timeout=120)
            if fio.returncode != 0:
                out.fio_errors = (fio_err.strip().splitlines() or ["exit %d" % fio.returncode]
                                  )[-1]
                out.problems.append("fio failed: %s" % out.fio_errors)
            else:
                job = json.loads(fio_out[fio_out.index("{"):])["jobs"][0]
                out.fio_writes = int(job["write"]["total_ios"])
                if job.get("error"):
                    out.problems.append("fio reported error %s" % job["error"])
            try:
                barrier = writer.finish()
            except AssertionError as e:
                out.problems.append("the oracle writer saw an error: %s" % e)
                barrier = 0
            out.oracle_acked = writer.log.acked
            out.connections = proxy.connections
            a.ferry("wait", "g1", "--synced", "--timeout", "300")
            images = {}
            for name in ("vda", "vdb"):
                dest = work / ("restored-%s.img" % name)
                b.ferry("restore", "g1", "--disk", name, "--to", str(dest))
                images[name] = dest
            try:
                v = check({"vda": str(images["vda"])}, writer.log, barrier)
                out.oracle = "prefix %d of %d acked writes" % (v.prefix, writer.log.acked)
                if v.prefix != writer.log.acked:
                    out.problems.append("oracle: the newest point is a prefix of %d, not %d"
                                        % (v.prefix, writer.log.acked))
            except OracleFailure as e:
                out.oracle = "FAILED: %s" % e
                out.problems.append("oracle failed: %s" % e)
            out.vdb_same = _same(images["vdb"], work / "vdb.img")
            if not out.vdb_same:
                out.problems.append("vdb: site B's newest point differs from the source")
        return out
    finally:
        if fio is not None and fio.poll() is None:
            fio.kill()
            fio.wait()
        if writer is not None:
            writer.close()
        for site in (a, b):
            site.stop()
            site.kill_splitters()
            site.kill_exports()


def _same(x: Path, y: Path) -> bool:
    with open(x, "rb") as f, open(y, "rb") as g:
        while True:
            p, q = f.read(MiB), g.read(MiB)
            if p != q:
                return False
            if not p:
                return True


def report(out: Outcome) -> None:
    print("flap: %.0f s, %d cuts, %d connections through the proxy" % (
        out.seconds, out.cuts, out.connections))
    print("flap: oracle writer on vda: %d acked writes; restored newest point: %s" % (
        out.oracle_acked, out.oracle))
    print("flap: fio on vdb: %d writes, %s; restored newest point %s the source" % (
        out.fio_writes, "errors: " + out.fio_errors if out.fio_errors else "no error",
        "equals" if out.vdb_same else "DIFFERS from"))
    for site, s in sorted(out.samples.items()):
        if not s:
            continue
        rss, fds, thr = out.slopes(site)
        print("flap: agent %s: RSS %d -> %d KiB, fds %d -> %d, threads %d -> %d (%d samples); "
            "second half: RSS %+.0f KiB/min, fds %+.2f/min, threads %+.2f/min" % (
                site, s[0][1], s[-1][1], s[0][2], s[-1][2], s[0][3], s[-1][3], len(s),
                rss, fds, thr))
    print("flap: %s" % ("passed" if out.ok else "FAILED: " + "; ".join(out.problems)))


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="10 s of flapping, up 0.5-2 s between cuts")
    p.add_argument("--minutes", type=float,
                   default=float(os.environ.get("FLAP_MINUTES", 5)))
    p.add_argument("--seed", type=int, default=int(os.environ.get("FLAP_SEED", 1)))
    args = p.parse_args(argv)
    seconds = 10.0 if args.quick else args.minutes * 60
    up = (0.5, 2.0) if args.quick else (1.0, 5.0)
    work = Path(tempfile.mkdtemp(prefix="fyflap"))
    print("flap: %.0f s of flapping, started %s" % (
        seconds, time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())), flush=True)
    try:
        out = run(seconds, work, args.seed, up)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report(out)
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
