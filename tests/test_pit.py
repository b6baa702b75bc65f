"""Any point in time end to end: checkpoints cut on site A, journaled and restored on site B,
checked byte for byte against the source images saved at each checkpoint."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List, Tuple

import nbd
from conftest import Lab, first_difference, same_bytes

MiB = 1024 * 1024


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def scribble(h: nbd.NBD, size: int, rng: random.Random, n: int = 40) -> None:
    """Distinct patterns at random places, a zeroed range, then a flush."""
    for _ in range(n):
        length = rng.choice([512, 4096, 65536])
        h.pwrite(rng.randbytes(length), rng.randrange(0, size - length, 512))
    h.zero(4096 * rng.randrange(0, 16), rng.randrange(0, size // 4 - 65536, 4096))
    h.flush()


def wait_replicating(lab: Lab, group: str, timeout: float = 60) -> None:
    lab.a.ferry("wait", group, "--synced", "--timeout", str(timeout))
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lab.a.status(group)["groups"][group]["state"] == "replicating":
            return
        time.sleep(0.1)
    raise AssertionError("group %s not replicating" % group)


def checkpoint_series(lab: Lab, group: str, disks: Dict[str, Path], uris: Dict[str, str],
                      rounds: int, seed: int) -> List[Tuple[str, str, Dict[str, Path]]]:
    """Write, pause, checkpoint with a tag, save the source images; ``rounds`` times."""
    rng = random.Random(seed)
    handles = {name: connect(uri) for name, uri in uris.items()}
    saved = []
    for i in range(rounds):
        for name, h in handles.items():
            scribble(h, disks[name].stat().st_size, rng)
        tag = "round-%d" % i
        cid = lab.a.ferry("checkpoint", group, "--tag", tag).stdout.strip()
        copies = {}
        for name, path in disks.items():
            copies[name] = lab.work / ("%s-%s.img" % (tag, name))
            shutil.copyfile(path, copies[name])
        saved.append((cid, tag, copies))
    for name, h in handles.items():  # writes go on after the last checkpoint
        scribble(h, disks[name].stat().st_size, rng, 10)
        h.shutdown()
    return saved


def restore_to(lab: Lab, group: str, disk: str, *point: str) -> Path:
    dest = lab.work / ("restored-%s-%s-%d.img" % (group, disk, time.monotonic_ns()))
    lab.b.ferry("restore", group, "--disk", disk, "--to", str(dest), *point)
    return dest


def test_every_checkpoint_restores_exact_bytes(sites: Lab) -> None:
    disks = {"sys": sites.image("sys.img", 16 * MiB), "data": sites.image("data.img", 8 * MiB)}
    uris = sites.protect("vm1", *disks.values(), extra=("--checkpoint-interval", "0.2s"))
    wait_replicating(sites, "vm1")
    saved = checkpoint_series(sites, "vm1", disks, uris, 4, seed=7)
    sites.a.ferry("wait", "vm1", "--synced", "--timeout", "60")

    listing = json.loads(sites.b.ferry("checkpoints", "vm1", "--json").stdout)["target"]
    ids = [c["id"] for c in listing]
    assert all(cid in ids for cid, _tag, _copies in saved)
    assert {c["kind"] for c in listing} == {"auto", "user"}
    source = json.loads(sites.a.ferry("checkpoints", "vm1", "--json").stdout)["source"]
    assert all(c["acked"] for c in source if c["kind"] == "user")

    for n, (cid, tag, copies) in enumerate(saved):
        for name, copy in copies.items():
            ref = cid if n % 2 else tag  # by id and by tag
            restored = restore_to(sites, "vm1", name, "--checkpoint", ref)
            assert same_bytes(copy, restored), (tag, name, first_difference(copy, restored))
    # No option: the newest consistent state, as before.
    for name, path in disks.items():
        restored = restore_to(sites, "vm1", name)
        assert same_bytes(path, restored), first_difference(path, restored)
    # --at: the newest checkpoint at or before that time.
    last = next(c for c in listing if c["id"] == saved[-1][0])
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(last["wall_ns"] / 1e9)) + ".%06dZ" % (
        last["wall_ns"] // 1000 % 1000000)
    restored = restore_to(sites, "vm1", "sys", "--at", at)
    assert same_bytes(saved[-1][2]["sys"], restored)


def test_point_errors_are_one_line(sites: Lab) -> None:
    disk = sites.image("vda.img", 4 * MiB)
    sites.protect("g1", disk)
    wait_replicating(sites, "g1")
    sites.a.ferry("checkpoint", "g1", "--tag", "one")
    dest = str(sites.work / "x.img")
    for args, words in (
            (("--checkpoint", "nosuch"), "no checkpoint with id or tag"),
            (("--at", "2001-01-01T00:00:00Z"), "no checkpoint at or before"),
            (("--at", "yesterday"), "not an ISO 8601 time"),
            (("--checkpoint", "one", "--at", "2001-01-01T00:00:00Z"), "not both")):
        proc = sites.b.ferry("restore", "g1", "--disk", "vda", "--to", dest, *args, check=False)
        assert proc.returncode != 0
        assert words in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    proc = sites.b.ferry("restore", "g1", "--disk", "nope", "--to", dest, check=False)
    assert proc.returncode != 0 and "has no disk nope" in proc.stderr
    proc = sites.a.ferry("checkpoint", "nosuch", check=False)
    assert proc.returncode != 0 and "no group nosuch" in proc.stderr
