"""The control plane under load: ``status`` latency with fio writing and 50 callers per site,
and site A's memory before, during and after a write burst (issue 18).

    python bench/control_plane.py [--quick] [--callers 50] [--think 0.5] [--burst 30]
                                  [--after 60] [--size-mib 1024] [--out FILE]

Two agents on loopback (``bench/pair.py``); one disk protected and synced. Then:

- **idle**: site A's resident set (``VmRSS``), the median of samples over a few seconds;
- **burst**: fio writes ~20 MB/s through the splitter (random 4/16/64 KiB and sequential
  1 MiB writes, as ``rpo.py``) for ``--burst`` seconds; from 1 s in, ``--callers`` callers
  *per site* each ask ``GET /v1/status`` over the site's API socket (HTTP over the Unix
  socket, a new connection each time, as the CLI does), wait a random time (uniform, from
  0 to twice ``--think``: callers are independent, not in step), and ask again, until fio
  ends; each starts at a random moment of its first ``--think`` seconds. A call's latency
  is from connect to the last byte of the answer.
  A's RSS is sampled every 0.25 s: the burst's peak is the largest sample;
- **after**: nothing asked, nothing written, for ``--after`` seconds; A's RSS at the end.

Printed and written to ``bench/results/control_plane.json``: status p50/p99/max on A and B
(goal p99 <= 50 ms), calls answered and failed, and A's RSS idle, at the peak and after
(goal: at least 75 % of what the burst took is given back, or A is back within 8 MiB of
idle: a ratio says little of a burst that took a few MiB). ``--quick``: a 256 MiB disk,
a 15 s burst, 20 s after (about a minute in all).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Dict, List

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import report
from pair import Pair, fio_command

MiB = 1024 * 1024
GROUP = "cp"
RATE = 20_000_000
JOBS = [
    ["--rw=randwrite", "--bssplit=4k/50:16k/30:64k/20", "--iodepth=8",
     "--rate=%d" % (RATE * 6 // 10)],
    ["--rw=write", "--bs=1m", "--iodepth=1", "--rate=%d" % (RATE * 4 // 10)],
]
GOAL_P99_S = 0.050
GOAL_GIVEN_BACK = 0.75
GOAL_NEAR_IDLE_KIB = 8 * 1024  # or back within this much of idle (a burst that took little)
REQUEST = b"GET /v1/status HTTP/1.1\r\nHost: ferry\r\nConnection: close\r\n\r\n"


async def call(sock: str, timeout: float = 30.0) -> float:
    """One status call over ``sock``: its latency in seconds (ValueError unless a 200)."""
    t0 = time.monotonic()
    reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock), timeout)
    try:
        writer.write(REQUEST)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()
    if not answer.startswith(b"HTTP/1.1 200"):
        raise ValueError(answer[:80])
    return time.monotonic() - t0


async def caller(sock: str, think: float, until: float, out: List[float],
                 failures: List[str]) -> None:
    await asyncio.sleep(random.uniform(0, think))
    while time.monotonic() < until:
        try:
            out.append(await call(sock))
        except (OSError, ValueError, asyncio.TimeoutError) as e:
            failures.append(repr(e)[:120])
        await asyncio.sleep(random.uniform(0, 2 * think))


async def rss_sampler(pid: int, period: float, stop: asyncio.Event,
                      out: List[Dict[str, float]]) -> None:
    start = time.monotonic()
    while not stop.is_set():
        out.append({"t": time.monotonic() - start, "rss_kib": report.rss_kib(pid)})
        try:
            await asyncio.wait_for(stop.wait(), period)
        except asyncio.TimeoutError:
            pass


def stats(xs: List[float]) -> Dict[str, float]:
    return {"n": len(xs), "p50": report.percentile(xs, 50), "p99": report.percentile(xs, 99),
            "max": max(xs, default=float("nan"))}


async def measure(p: Pair, uri: str, size: int, args: argparse.Namespace) -> Dict[str, Any]:
    assert p.a.proc is not None
    apid = p.a.proc.pid
    socks = {"A": str(p.a.data / "api.sock"), "B": str(p.b.data / "api.sock")}
    idle_samples: List[Dict[str, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(rss_sampler(apid, 0.25, stop, idle_samples))
    await asyncio.sleep(args.idle)
    stop.set()
    await sampler
    idle = statistics.median(s["rss_kib"] for s in idle_samples)

    burst_samples: List[Dict[str, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(rss_sampler(apid, 0.25, stop, burst_samples))
    fio = await asyncio.create_subprocess_exec(
        *fio_command(uri, size, args.burst, JOBS), stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE)
    await asyncio.sleep(1.0)
    until = time.monotonic() + args.burst - 1.0
    lat: Dict[str, List[float]] = {"A": [], "B": []}
    failures: Dict[str, List[str]] = {"A": [], "B": []}
    callers = [caller(socks[s], args.think, until, lat[s], failures[s])
               for s in ("A", "B") for _ in range(args.callers)]
    await asyncio.gather(*callers)
    out, err = await fio.communicate()
    stop.set()
    await sampler
    if fio.returncode != 0:
        raise RuntimeError("fio failed: %s" % err.decode(errors="replace")[-400:])
    jobs = report.fio_json(out.decode())["jobs"]
    peak = max(s["rss_kib"] for s in burst_samples)

    after_samples: List[Dict[str, float]] = []
    stop = asyncio.Event()
    sampler = asyncio.ensure_future(rss_sampler(apid, 1.0, stop, after_samples))
    await asyncio.sleep(args.after)
    stop.set()
    await sampler
    after = after_samples[-1]["rss_kib"]
    return {"status_s": {s: stats(lat[s]) for s in lat},
            "failures": {s: len(failures[s]) for s in failures},
            "failure_examples": {s: failures[s][:3] for s in failures},
            "rss_kib": {"idle": idle, "peak": peak, "after": after},
            "fio_mb_s": sum(j["write"]["bw_bytes"] for j in jobs) / 1e6,
            "series": {"burst": burst_samples, "after": after_samples}}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--callers", type=int, default=50, help="per site")
    ap.add_argument("--think", type=float, default=0.5)
    ap.add_argument("--burst", type=float, default=None)
    ap.add_argument("--after", type=float, default=None)
    ap.add_argument("--idle", type=float, default=3.0)
    ap.add_argument("--size-mib", type=int, default=None)
    ap.add_argument("--out")
    args = ap.parse_args()
    args.burst = args.burst or (15.0 if args.quick else 30.0)
    args.after = args.after or (20.0 if args.quick else 60.0)
    size = (args.size_mib or (256 if args.quick else 1024)) * MiB
    with Pair("fcp") as p:
        image = p.image("vda", size)
        uri = p.protect(GROUP, [image])["vda"]
        p.a.ferry("wait", GROUP, "--synced", "--timeout", "300")
        r = asyncio.run(measure(p, uri, size, args))
    st, rss = r["status_s"], r["rss_kib"]
    taken = rss["peak"] - rss["idle"]
    given = (rss["peak"] - rss["after"]) / taken if taken > 0 else 1.0
    figures = [report.figure(
        "status latency on site %s, fio writing, %d callers (p50 / p99)" % (s, args.callers),
        "%.1f / %.1f ms" % (st[s]["p50"] * 1e3, st[s]["p99"] * 1e3),
        goal="p99 <= %d ms" % (GOAL_P99_S * 1e3), met=st[s]["p99"] <= GOAL_P99_S,
        **st[s]) for s in ("A", "B")]
    figures.append(report.figure(
        "site A RSS idle / burst peak / %ds after" % args.after,
        "%.0f / %.0f / %.0f MiB" % (rss["idle"] / 1024, rss["peak"] / 1024,
                                    rss["after"] / 1024),
        goal=">= %d%% of the burst's memory given back, or within %d MiB of idle"
        % (GOAL_GIVEN_BACK * 100, GOAL_NEAR_IDLE_KIB // 1024),
        met=given >= GOAL_GIVEN_BACK or rss["after"] - rss["idle"] <= GOAL_NEAR_IDLE_KIB,
        given_back=round(given, 3), **rss))
    report.print_figures(figures)
    print("calls answered A %d, B %d; failed A %d, B %d; fio %.1f MB/s"
          % (st["A"]["n"], st["B"]["n"], r["failures"]["A"], r["failures"]["B"],
             r["fio_mb_s"]))
    report.write("control_plane", args.out, vars(args), figures, **r)
    return 0


if __name__ == "__main__":
    sys.exit(main())
