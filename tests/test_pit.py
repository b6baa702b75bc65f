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
from conftest import Lab, first_difference, same_bytes, samples

from agent.errors import EXIT_CONFLICT, EXIT_NOT_FOUND

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
    h.zero(4096 * rng.randrange(1, 16), rng.randrange(0, size // 4 - 65536, 4096))
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
    up = last["wall_ns"] // 1000 + 1  # microseconds, rounded up: at or after the checkpoint
    at = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(up // 10**6)) + ".%06dZ" % (up % 10**6)
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
    for args in (("view", "g1", "--checkpoint", "nosuch"),
                 ("failover", "g1", "--test", "--checkpoint", "nosuch"),
                 ("failover", "g1", "--live", "--at", "2001-01-01T00:00:00Z")):
        proc = sites.b.ferry(*args, check=False)
        assert proc.returncode == EXIT_NOT_FOUND and "no checkpoint" in proc.stderr, \
            proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = sites.b.ferry("failover", "g1", "--stop-test", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "no test failover running" in proc.stderr
    proc = sites.b.ferry("view-close", "nosuch", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "no view nosuch" in proc.stderr
    sites.b.stop()  # no session: no checkpoint can be cut
    deadline = time.monotonic() + 30
    while sites.a.status("g1")["groups"]["g1"]["state"] == "replicating":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    proc = sites.a.ferry("checkpoint", "g1", check=False)
    assert proc.returncode == EXIT_CONFLICT and "is not replicating" in proc.stderr, proc.stderr


def read_all(uri: str, size: int) -> bytes:
    h = connect(uri)
    try:
        out = bytearray()
        for off in range(0, size, 4 * MiB):
            out += h.pread(min(4 * MiB, size - off), off)
        return bytes(out)
    finally:
        h.shutdown()


def test_views_and_test_failover_while_writes_continue(sites: Lab) -> None:
    disks = {"vda": sites.image("vda.img", 8 * MiB)}
    uris = sites.protect("g1", *disks.values(), extra=("--checkpoint-interval", "0.2s"))
    wait_replicating(sites, "g1")
    saved = checkpoint_series(sites, "g1", disks, uris, 3, seed=11)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")

    # A read-only view per checkpoint, read through libnbd, equals the saved image.
    for cid, tag, copies in saved:
        v = json.loads(sites.b.ferry("view", "g1", "--checkpoint", cid, "--json").stdout)
        assert v["checkpoint"]["id"] == cid and v["checkpoint"]["tag"] == tag
        h = connect(v["disks"]["vda"])
        assert h.is_read_only()
        h.shutdown()
        assert read_all(v["disks"]["vda"], 8 * MiB) == copies["vda"].read_bytes(), tag
        sites.b.ferry("view-close", v["id"])

    # A test failover from the oldest checkpoint takes writes while replication goes on.
    before = sites.b.status("g1")["replicas"]["g1"]
    journal = sorted(p.name for p in (sites.b.data / "target" / "g1" / "journal").iterdir())
    replica = (sites.b.data / "target" / "g1" / "replicas" / "vda.img").read_bytes()
    t = json.loads(sites.b.ferry("failover", "g1", "--test", "--checkpoint", saved[0][1],
                                 "--json").stdout)
    h = connect(t["disks"]["vda"])
    assert not h.is_read_only()
    h.pwrite(b"T" * 65536, 0)
    h.flush()
    assert h.pread(65536, 0) == b"T" * 65536
    h.shutdown()
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["test"]["id"] == t["id"] and st["test"]["checkpoint"]["id"] == saved[0][0]
    # Writes on the source go on and are checkpointed meanwhile.
    src = connect(uris["vda"])
    src.pwrite(b"L" * 4096, 4096)
    src.flush()
    src.shutdown()
    later = sites.a.ferry("checkpoint", "g1", "--tag", "during-test").stdout.strip()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    sites.b.ferry("failover", "g1", "--stop-test")
    assert sites.b.status("g1")["replicas"]["g1"]["test"] is None
    # The replica is untouched, the journal only grew, the later checkpoint holds its bytes.
    assert (sites.b.data / "target" / "g1" / "replicas" / "vda.img").read_bytes() == replica
    now = sorted(p.name for p in (sites.b.data / "target" / "g1" / "journal").iterdir())
    assert set(journal) <= set(now)
    after = sites.b.status("g1")["replicas"]["g1"]
    assert after["disks"]["vda"]["applied_seq"] == before["disks"]["vda"]["applied_seq"]
    restored = restore_to(sites, "g1", "vda", "--checkpoint", later)
    assert same_bytes(disks["vda"], restored), first_difference(disks["vda"], restored)
    listing = json.loads(sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"]
    tested = next(c for c in listing if c["id"] == saved[0][0])
    assert "tested" in tested["tags"]
    # The test's write is nowhere.
    assert read_all(restore_uri(sites, "g1", saved[0][0]), 65536) != b"T" * 65536


def restore_uri(lab: Lab, group: str, ref: str) -> str:
    v = json.loads(lab.b.ferry("view", group, "--checkpoint", ref, "--json").stdout)
    return str(v["disks"]["vda"])


def test_failover_live_at_a_checkpoint(sites: Lab) -> None:
    disks = {"vda": sites.image("vda.img", 8 * MiB)}
    uris = sites.protect("g1", *disks.values())
    wait_replicating(sites, "g1")
    saved = checkpoint_series(sites, "g1", disks, uris, 2, seed=5)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    sites.a.stop()  # site A is gone
    out = json.loads(sites.b.ferry("failover", "g1", "--live", "--checkpoint", saved[0][0],
                                   "--json").stdout)
    assert out["live"] and out["failover"]["checkpoint"]["id"] == saved[0][0]
    uri = out["disks"]["vda"]
    assert read_all(uri, 8 * MiB) == saved[0][2]["vda"].read_bytes()
    h = connect(uri)  # the live disk takes writes
    h.pwrite(b"N" * 4096, 0)
    h.flush()
    h.shutdown()
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["failover"]["state"] == "done"
    assert st["failover"]["checkpoint"]["id"] == saved[0][0]
    proc = sites.b.ferry("failover", "g1", "--live", check=False)
    assert proc.returncode != 0 and "already failed over" in proc.stderr
    # Restarted, site B serves the live disk again, with the write.
    sites.b.stop()
    sites.b.start()
    uri = sites.b.status("g1")["replicas"]["g1"]["views"][0]["disks"]["vda"]
    assert read_all(uri, 4096) == b"N" * 4096


def test_history_window_and_journal_limit_end_to_end(sites: Lab) -> None:
    disks = {"vda": sites.image("vda.img", 8 * MiB)}
    uris = sites.protect("g1", *disks.values(), extra=("--history", "3s"))
    wait_replicating(sites, "g1")
    saved = checkpoint_series(sites, "g1", disks, uris, 2, seed=21)
    time.sleep(6)  # the first segments leave the window; promotion runs on its own
    saved += checkpoint_series(sites, "g1", disks, uris, 2, seed=22)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = sites.b.status("g1")["replicas"]["g1"]
        held = {c["id"] for c in json.loads(
            sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"]}
        if saved[0][0] not in held:
            break
        time.sleep(0.5)
    assert saved[0][0] not in held and saved[1][0] not in held, "nothing left the window"
    assert st["disks"]["vda"]["applied_seq"] > 0 and st["history_s"] == 3
    assert st["history_covered_s"] < 60
    proc = sites.b.ferry("restore", "g1", "--disk", "vda", "--to", str(sites.work / "x.img"),
                         "--checkpoint", saved[0][0], check=False)
    assert proc.returncode != 0 and "no checkpoint with id or tag" in proc.stderr
    for cid, _tag, copies in saved[2:]:
        if cid in held:
            restored = restore_to(sites, "g1", "vda", "--checkpoint", cid)
            assert same_bytes(copies["vda"], restored), first_difference(copies["vda"], restored)
    restored = restore_to(sites, "g1", "vda")
    assert same_bytes(disks["vda"], restored), first_difference(disks["vda"], restored)
    b = samples(sites.b.api("GET", "/metrics"))
    assert ("ferry_history_covered_seconds", (("group", "g1"),)) in b
    assert b[("ferry_history_short", (("group", "g1"),))] == 0
    assert b[("ferry_checkpoints", (("group", "g1"),))] >= 1
    a = samples(sites.a.api("GET", "/metrics"))
    assert a[("ferry_checkpoints_unacked", (("group", "g1"),))] == 0


def test_journal_limit_gives_up_history_with_an_alert(sites: Lab) -> None:
    disks = {"vda": sites.image("vda.img", 16 * MiB)}
    uris = sites.protect("g1", *disks.values(), extra=("--journal-max", "2M"))
    wait_replicating(sites, "g1")
    h = connect(uris["vda"])
    rng = random.Random(31)
    for i in range(48):
        h.pwrite(rng.randbytes(256 * 1024), (i % 64) * 256 * 1024)
    h.flush()
    h.shutdown()
    cid = sites.a.ferry("checkpoint", "g1", "--tag", "end").stdout.strip()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        st = sites.b.status("g1")["replicas"]["g1"]
        if st["history_short"] and st["journal_bytes"] <= 2 * MiB + 4 * MiB:
            break
        time.sleep(0.5)
    assert st["history_short"], st
    assert "ALERT" in sites.b.log.read_text()
    restored = restore_to(sites, "g1", "vda", "--checkpoint", cid)
    assert same_bytes(disks["vda"], restored), first_difference(disks["vda"], restored)


def test_site_b_killed_mid_append_loses_no_acked_checkpoint(sites: Lab) -> None:
    """kill -9 of site B while writes and checkpoints go on: every checkpoint the source saw
    acked is still there after the restart, with the exact bytes."""
    disks = {"vda": sites.image("vda.img", 8 * MiB)}
    uris = sites.protect("g1", *disks.values(), extra=("--checkpoint-interval", "0.1s"))
    wait_replicating(sites, "g1")
    rng = random.Random(41)
    h = connect(uris["vda"])
    saved = []
    for i in range(12):
        scribble(h, 8 * MiB, rng, 20)
        proc = sites.a.ferry("checkpoint", "g1", "--tag", "k%d" % i, "--timeout", "5",
                             check=False)
        if proc.returncode == 0 and "not journaled" not in proc.stderr:
            copy = sites.work / ("k%d.img" % i)
            shutil.copyfile(disks["vda"], copy)
            saved.append((proc.stdout.strip(), copy))
        if i % 4 == 1:
            sites.b.kill()  # mid-append: batches stream in all the time
            scribble(h, 8 * MiB, rng, 20)
            sites.b.start()
            wait_replicating(sites, "g1")
    h.shutdown()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    assert len(saved) >= 10
    held = {c["id"] for c in json.loads(
        sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"]}
    for cid, copy in saved:
        assert cid in held
        restored = restore_to(sites, "g1", "vda", "--checkpoint", cid)
        assert same_bytes(copy, restored), first_difference(copy, restored)
    restored = restore_to(sites, "g1", "vda")
    assert same_bytes(disks["vda"], restored)


def test_site_b_killed_while_promoting_keeps_replica_and_window_exact(sites: Lab) -> None:
    """A 2 s window: site B promotes segments to the replica about every second while it is
    killed (-9) again and again; what it still holds restores to the exact bytes."""
    disks = {"vda": sites.image("vda.img", 8 * MiB)}
    uris = sites.protect("g1", *disks.values(), extra=("--history", "2s",
                                                        "--checkpoint-interval", "0.2s"))
    wait_replicating(sites, "g1")
    rng = random.Random(51)
    h = connect(uris["vda"])
    saved = []
    for i in range(10):
        scribble(h, 8 * MiB, rng, 30)
        proc = sites.a.ferry("checkpoint", "g1", "--tag", "p%d" % i, "--timeout", "5",
                             check=False)
        if proc.returncode == 0 and "not journaled" not in proc.stderr:
            copy = sites.work / ("p%d.img" % i)
            shutil.copyfile(disks["vda"], copy)
            saved.append((proc.stdout.strip(), copy))
        time.sleep(rng.uniform(0.3, 1.5))  # segments age out and get promoted meanwhile
        if i % 3 == 2:
            sites.b.kill()
            sites.b.start()
            wait_replicating(sites, "g1")
    h.shutdown()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["disks"]["vda"]["applied_seq"] > 0  # promotion happened
    held = {c["id"] for c in json.loads(
        sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"]}
    checked = 0
    for cid, copy in saved:
        if cid in held:
            restored = restore_to(sites, "g1", "vda", "--checkpoint", cid)
            assert same_bytes(copy, restored), first_difference(copy, restored)
            checked += 1
    assert checked >= 1
    restored = restore_to(sites, "g1", "vda")
    assert same_bytes(disks["vda"], restored), first_difference(disks["vda"], restored)
