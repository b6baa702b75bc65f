"""Pre-seeded sync next to rsync: a disk whose copy at site B differs in 1% of its chunks.

    python bench/preseed_sync.py [--quick] [--size MiB] [--changed PERCENT] [--reps N]

The disk is incompressible (random) data; the seed is a copy of it with ``--changed`` % of
its 1 MiB chunks rewritten with other random data. Each repetition, interleaved:

- Ferry: ``protect --preseeded`` then ``wait --synced`` between two agents on this machine
  (site B adopts the seed: copies and hashes it; the splitter reads the disk back, the
  shipper sends only the chunks whose digest differs). Bytes over the link: frames sent
  by site A plus frames it received (digests, acks). The replica is restored and compared,
  and the seed file must be unchanged.
- Ferry without a seed (the plain initial sync of the same disk), for scale.
- ``rsync --inplace --no-whole-file -I --stats`` from the disk onto a fresh copy of the
  seed (local rsync would copy whole files, and skip files that look unchanged, without
  those flags). Bytes: rsync's "Total bytes sent" plus "Total bytes received". Also the
  time to make that copy (``cp --sparse=always`` and ``sync``): Ferry never writes into
  the admin's seed, so it pays for a copy that rsync ``--inplace`` does not.

Page caches are warm for all of them (the files were just written). The median of the
repetitions is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from agent.seed import CHUNK
from lab.sites import Site

MiB = 1024 * 1024
HERE = Path(__file__).resolve().parent


def make_files(work: Path, size: int, changed: float) -> Tuple[Path, Path, int]:
    disk, seed = work / "disk.img", work / "seed.img"
    with open(disk, "wb") as f:
        for _ in range(size // MiB):
            f.write(os.urandom(MiB))
    shutil.copyfile(disk, seed)
    rng = random.Random(1)
    n = max(1, round(size // CHUNK * changed / 100))
    with open(seed, "r+b") as f:
        for c in sorted(rng.sample(range(size // CHUNK), n)):
            f.seek(c * CHUNK)
            f.write(os.urandom(CHUNK))
    return disk, seed, n


def sha(path: Path) -> str:
    out = subprocess.run(["sha256sum", str(path)], capture_output=True, text=True, check=True)
    return out.stdout.split()[0]


def ferry(work: Path, disk: Path, seed: Optional[Path]) -> Dict[str, Any]:
    root = work / "r"
    root.mkdir(exist_ok=True)
    a, b = Site("A", root), Site("B", root)
    try:
        b.start()
        a.start()
        args = ["protect", "s", "--disk", "vda=%s" % disk, "--target", b.address]
        if seed is not None:
            args += ["--preseeded", "vda=%s" % seed]
        t = time.monotonic()
        a.ferry(*args)
        a.ferry("wait", "s", "--synced", "--timeout", "3600")
        seconds = time.monotonic() - t
        g = a.status("s")["groups"]["s"]
        d = g["disks"]["vda"]
        restored = work / "restored.img"
        b.ferry("restore", "s", "--disk", "vda", "--to", str(restored))
        same = subprocess.run(["cmp", "-s", str(disk), str(restored)]).returncode == 0
        restored.unlink()
        m = re.search(r"adopted in ([\d.]+) s", b.log.read_text())
        a.ferry("unprotect", "s")
        return {"seconds": seconds, "identical": same,
                "link_bytes": g["bytes_sent"] + g["bytes_received"],
                "bytes_sent": g["bytes_sent"], "bytes_received": g["bytes_received"],
                "data_shipped": d["bytes_shipped"], "skipped": d["resync_skipped_bytes"],
                "adopt_s": float(m.group(1)) if m else None}
    finally:
        for site in (a, b):
            site.stop()
            site.kill_splitters()
        shutil.rmtree(root, ignore_errors=True)


def rsync(work: Path, disk: Path, seed: Path) -> Dict[str, Any]:
    dest = work / "rsync-dest.img"
    t = time.monotonic()
    subprocess.run(["cp", "--sparse=always", str(seed), str(dest)], check=True)
    subprocess.run(["sync", str(dest)], check=True)
    copy_s = time.monotonic() - t
    t = time.monotonic()
    out = subprocess.run(["rsync", "--inplace", "--no-whole-file", "-I", "--stats", str(disk),
                          str(dest)], capture_output=True, text=True, check=True).stdout
    seconds = time.monotonic() - t

    def stat(name: str) -> int:
        m = re.search(r"^%s: ([\d,]+)" % name, out, re.M)
        assert m, out
        return int(m.group(1).replace(",", ""))

    same = subprocess.run(["cmp", "-s", str(disk), str(dest)]).returncode == 0
    dest.unlink()
    return {"seconds": seconds, "copy_s": copy_s, "identical": same,
            "link_bytes": stat("Total bytes sent") + stat("Total bytes received"),
            "literal": stat("Literal data")}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size", type=int, default=None, help="disk size in MiB")
    ap.add_argument("--changed", type=float, default=1.0, help="%% of chunks that differ")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-plain", action="store_true",
                    help="skip Ferry's initial sync without a seed")
    ap.add_argument("--out", default=str(HERE / "results" / "preseed_sync.json"))
    args = ap.parse_args()
    if shutil.which("rsync") is None:
        print("rsync is not installed (make apt installs it)", file=sys.stderr)
        return 1
    size = (args.size or (256 if args.quick else 1024)) * MiB
    work = Path(tempfile.mkdtemp(prefix="fyp", dir="/tmp"))
    try:
        load_before = os.getloadavg()
        disk, seed, nchanged = make_files(work, size, args.changed)
        seed_sha = sha(seed)
        runs = []
        for rep in range(args.reps):
            r = rsync(work, disk, seed)
            f = ferry(work, disk, seed)
            p = None if args.no_plain else ferry(work, disk, None)
            runs.append({"rsync": r, "ferry": f, "ferry_plain": p})
            print("rep %d: ferry %.2f s (adopt %.1f s) %.2f MB   rsync %.2f s %.2f MB "
                  "(+ copy %.1f s)%s   identical %s/%s" % (
                      rep + 1, f["seconds"], f["adopt_s"] or 0, f["link_bytes"] / 1e6,
                      r["seconds"], r["link_bytes"] / 1e6, r["copy_s"],
                      "   ferry without seed %.1f s" % p["seconds"] if p else "",
                      f["identical"], r["identical"]), flush=True)
        seed_kept = sha(seed) == seed_sha

        def med(side: str, key: str) -> float:
            return statistics.median(r[side][key] for r in runs)

        fs, rs = med("ferry", "seconds"), med("rsync", "seconds")
        fb, rb = med("ferry", "link_bytes"), med("rsync", "link_bytes")
        adopt = med("ferry", "adopt_s") if all(r["ferry"]["adopt_s"] for r in runs) else 0.0
        copy = med("rsync", "copy_s")
        print()
        print("disk %d MiB of random data; seed differs in %d of %d chunks of %d KiB (%.1f%%); "
              "median of %d" % (size // MiB, nchanged, size // CHUNK, CHUNK // 1024,
                                100 * nchanged / (size // CHUNK), args.reps))
        print("%-40s %9s %12s" % ("", "seconds", "link MB"))
        print("%-40s %9.2f %12.3f" % ("ferry --preseeded (protect to synced)", fs, fb / 1e6))
        print("%-40s %9.2f" % ("  of which site B adopts the seed", adopt))
        print("%-40s %9.2f" % ("  the rest", fs - adopt))
        print("%-40s %9.2f %12.3f" % ("rsync --inplace --no-whole-file", rs, rb / 1e6))
        print("%-40s %9.2f" % ("cp --sparse=always + sync of the seed", copy))
        if not args.no_plain:
            print("%-40s %9.2f %12.3f" % ("ferry without a seed", med("ferry_plain", "seconds"),
                                         med("ferry_plain", "link_bytes") / 1e6))
        print("ferry / rsync: %.2fx the time, %.2fx the bytes; against copy + rsync %.2fx the "
              "time" % (fs / rs, fb / rb, fs / (copy + rs)))
        ok = all(r["ferry"]["identical"] and r["rsync"]["identical"]
                 and (r["ferry_plain"] is None or r["ferry_plain"]["identical"]) for r in runs)
        ok = ok and seed_kept
        print("replicas identical: %s; seed file unchanged: %s; load average %.1f -> %.1f "
              "(%d cpus)" % (ok, seed_kept, load_before[0], os.getloadavg()[0],
                             os.cpu_count() or 0))
        report = {"benchmark": "preseed_sync", "date": time.strftime("%F %T %z"),
                  "parameters": {"disk_bytes": size, "chunk_bytes": CHUNK,
                                 "changed_percent": args.changed, "changed_chunks": nchanged,
                                 "reps": args.reps, "quick": args.quick,
                                 "loadavg_before": load_before,
                                 "loadavg_after": os.getloadavg(), "cpus": os.cpu_count(),
                                 "rsync": subprocess.run(["rsync", "--version"],
                                                         capture_output=True,
                                                         text=True).stdout.splitlines()[0]},
                  "runs": runs,
                  "median": {"ferry_s": fs, "ferry_link_bytes": fb, "ferry_adopt_s": adopt,
                             "rsync_s": rs, "rsync_link_bytes": rb, "seed_copy_s": copy},
                  "seed_unchanged": seed_kept,
                  "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "figures": [{
                      "figure": "pre-seeded sync, %d MiB disk, %.0f%% of chunks differ"
                                % (size // MiB, 100 * nchanged / (size // CHUNK)),
                      "ferry": "%.2f s, %.2f MB over the link (%.2f s of it site B adopting "
                               "the seed)" % (fs, fb / 1e6, adopt),
                      "baseline": "rsync --inplace --no-whole-file %.2f s, %.2f MB"
                                  % (rs, rb / 1e6),
                      "ratio": round(rs / fs, 4),
                      "goal": ">= 3x faster than rsync, fewer bytes",
                      "met": rs / fs >= 3 and fb < rb}]}
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1))
        print("wrote %s" % args.out)
        return 0 if ok else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
