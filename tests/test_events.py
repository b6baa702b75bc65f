"""Events and alerts with real agents: a protect, an outage and a resync followed with
``ferry events --follow``; an RPO alert and a write-stream anomaly alert raised, hooked and
cleared; metrics parsed by prometheus_client."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

import nbd
from conftest import Lab, samples

from lab.sites import FERRY, REPO

MiB = 1024 * 1024


def wait_for(predicate: Any, timeout: float = 60, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out waiting for " + what)


def events(site: Any, *args: str) -> List[Dict[str, Any]]:
    out = site.ferry("events", "--json", *args).stdout
    return [json.loads(line) for line in out.splitlines()]


def find(evs: List[Dict[str, Any]], **fields: Any) -> List[Dict[str, Any]]:
    return [e for e in evs if all(e.get(k) == v for k, v in fields.items())]


def hook_dir(root: Path) -> Path:
    hooks = root / "hooks"
    hooks.mkdir()
    out = root / "hook.out"
    script = hooks / "50-record"
    script.write_text("#!/bin/sh\ncat >> %s\n" % out)
    script.chmod(0o755)
    unsafe = hooks / "60-unsafe"
    unsafe.write_text("#!/bin/sh\necho ran >> %s.unsafe\n" % out)
    unsafe.chmod(0o777)
    return hooks


def hooked(root: Path) -> List[Dict[str, Any]]:
    path = root / "hook.out"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_events_follow_a_protect_an_outage_and_a_resync(sites: Lab) -> None:
    follower = subprocess.Popen([*FERRY, "--api", sites.a.api_url, "events", "--follow",
                                 "--json"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        disk = sites.image("vda.img", 16 * MiB)
        with open(disk, "r+b") as f:
            f.write(os.urandom(16 * MiB))
        uri = sites.protect("g1", disk, extra=("--queue", "1M", "--bandwidth", "4M"))["vda"]
        sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
        h = nbd.NBD()
        h.connect_uri(uri)
        sites.b.stop()
        wait_for(lambda: find(events(sites.a), kind="link", change="down"), 30, "link down")
        for i in range(6):  # past the 1 MiB queue: the dirty map takes over
            h.pwrite(os.urandom(MiB), i * 2 * MiB)
        h.flush()
        wait_for(lambda: find(events(sites.a), kind="disk", new="bitmap"), 30, "bitmap")
        sites.b.start()
        sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
        wait_for(lambda: find(events(sites.a), kind="resync", change="end", sync="resyncing"),
                 30, "resync end")
        h.shutdown()
        sites.a.ferry("checkpoint", "g1", "--tag", "after the outage")
        wait_for(lambda: find(events(sites.b), kind="checkpoint", tag="after the outage"), 30,
                 "the tagged checkpoint on site B")
        time.sleep(1.5)
    finally:
        follower.terminate()
        out, _ = follower.communicate(timeout=30)
    followed = [json.loads(line) for line in out.splitlines()]
    ids = [e["id"] for e in followed]
    assert ids == sorted(set(ids)), "ids grow strictly"
    for fields in ({"kind": "agent", "change": "started"},
                   {"kind": "group", "change": "protected", "group": "g1"},
                   {"kind": "link", "change": "down", "group": "g1"},
                   {"kind": "disk", "new": "bitmap", "disk": "vda"},
                   {"kind": "link", "change": "up", "group": "g1"},
                   {"kind": "resync", "change": "start", "sync": "resyncing"},
                   {"kind": "resync", "change": "end", "sync": "resyncing"},
                   {"kind": "checkpoint", "side": "source", "group": "g1",
                    "tag": "after the outage", "type": "user"}):
        assert find(followed, **fields), (fields, followed)
    down = find(followed, kind="link", change="down")[0]
    assert down["severity"] == "warning"
    order = [find(followed, kind="link", change="down")[0]["id"],
             find(followed, kind="resync", change="start", sync="resyncing")[0]["id"],
             find(followed, kind="resync", change="end", sync="resyncing")[0]["id"]]
    assert order == sorted(order)
    # A consumer resumes after the last id it saw; the plain text form has one line each.
    middle = followed[len(followed) // 2]["id"]
    assert all(e["id"] > middle for e in events(sites.a, "--after", str(middle)))
    text = sites.a.ferry("events", "--after", str(middle)).stdout.splitlines()
    assert len(text) == len(events(sites.a, "--after", str(middle)))
    # Site B saw its side: the replica made, the source connected, checkpoints journaled.
    b = events(sites.b)
    assert find(b, kind="link", side="target", change="up", group="g1")
    assert find(b, kind="checkpoint", side="target", group="g1", tag="after the outage")
    assert not find(followed, kind="checkpoint", type="auto")  # automatic ones are no events
    # The status and the metrics agree on the state.
    m = samples(sites.a.api("GET", "/metrics"))
    assert m[("ferry_group_state", (("group", "g1"), ("state", "replicating")))] == 1
    assert m[("ferry_group_state", (("group", "g1"), ("state", "bitmap")))] == 0
    assert m[("ferry_link_up", (("group", "g1"),))] == 1
    assert m[("ferry_events_total", (("kind", "resync"),))] >= 4
    [info] = [dict(k[1]) for k in m if k[0] == "ferry_build_info"]
    assert info["site"] == "A" and info["version"] and info["python"]
    assert m[("ferry_bytes_written_total", (("disk", "vda"), ("group", "g1")))] >= 6 * MiB


def test_events_endpoint_bounds(sites: Lab) -> None:
    from agent.errors import Invalid
    for query in ("wait=61", "limit=0", "after=x"):
        try:
            sites.a.api("GET", "/v1/events?" + query)
        except Invalid:
            continue
        raise AssertionError("accepted " + query)
    started = time.monotonic()
    last = sites.a.api("GET", "/v1/events")["last_id"]
    result = sites.a.api("GET", "/v1/events?after=%d&wait=1" % last)
    assert result["events"] == [] and 0.9 < time.monotonic() - started < 10


def test_rpo_and_link_alerts_raised_hooked_and_cleared(sites: Lab) -> None:
    hooks = hook_dir(sites.root)
    sites.a.extra_args = ["--hooks", str(hooks), "--link-down-alert", "3s"]
    sites.a.stop()
    sites.a.start()
    disk = sites.image("vda.img", 16 * MiB)
    uri = sites.protect("g1", disk, extra=("--rpo-alert", "2s"))["vda"]
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    assert sites.a.ferry("alerts").stdout.strip() == "no alerts"
    sites.b.stop()
    h = nbd.NBD()
    h.connect_uri(uri)
    h.pwrite(b"x" * MiB, 0)
    h.flush()
    wait_for(lambda: {a["alert"] for a in sites.a.api("GET", "/v1/alerts")["active"]}
             >= {"rpo", "link-down"}, 60, "rpo and link-down alerts")
    wait_for(lambda: any(a["alert"] == "rpo" and a["severity"] == "error"
                         for a in sites.a.api("GET", "/v1/alerts")["active"]), 30, "RPO error")
    text = sites.a.ferry("alerts").stdout
    assert "rpo" in text and "link-down" in text and "over its alert of 2 s" in text
    m = samples(sites.a.api("GET", "/metrics"))
    assert m[("ferry_alert_firing", (("alert", "rpo"), ("group", "g1"), ("severity",
                                                                          "error")))] == 1
    assert m[("ferry_link_up", (("group", "g1"),))] == 0
    sites.b.start()
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    wait_for(lambda: sites.a.api("GET", "/v1/alerts")["active"] == [], 30, "alerts cleared")
    wait_for(lambda: find(hooked(sites.root), change="cleared", alert="link-down"), 30,
             "the hook ran for the clearing")
    runs = hooked(sites.root)
    assert find(runs, kind="alert", change="raised", alert="rpo", alert_severity="warning")
    assert find(runs, kind="alert", change="raised", alert="rpo", alert_severity="error")
    assert find(runs, kind="alert", change="cleared", alert="rpo")
    assert find(runs, kind="alert", change="raised", alert="link-down")
    assert not (sites.root / "hook.out.unsafe").exists()  # writable by all: never run
    log = sites.a.log.read_text()
    assert "WARNING ferry.alerts: ALERT rpo raised" in log
    assert "ERROR ferry.alerts: ALERT rpo raised" in log
    assert "INFO ferry.alerts: ALERT rpo cleared" in log
    assert "hook %s skipped" % (hooks / "60-unsafe") in log
    # The setting is kept across a restart, and can be turned off.
    sites.a.stop()
    sites.a.start()
    assert sites.a.api("GET", "/v1/alerts")["rpo_alert"] == {"g1": 2.0}
    assert json.loads(sites.a.ferry("set", "g1", "--rpo-alert", "0", "--json").stdout) \
        == {"group": "g1", "rpo_alert": None}
    proc = sites.a.ferry("set", "nosuch", "--rpo-alert", "5s", check=False)
    assert proc.returncode == 3 and "no group nosuch" in proc.stderr
    proc = sites.a.ferry("set", "g1", check=False)
    assert proc.returncode == 2


def text_block(seed: int) -> bytes:
    line = ("%08d the quick brown fox jumps over the lazy dog, logs compress well\n"
            % seed).encode()
    return (line * (MiB // len(line) + 1))[:MiB]


def test_anomaly_alert_on_a_burst_of_random_writes(sites: Lab) -> None:
    hooks = hook_dir(sites.root)
    sites.a.extra_args = ["--hooks", str(hooks)]
    sites.a.stop()
    sites.a.start()
    disk = sites.image("vda.img", 48 * MiB)
    with open(disk, "r+b") as f:  # a compressible file system image
        for i in range(48):
            f.write(text_block(i))
    uri = sites.protect("g1", disk)["vda"]
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    h = nbd.NBD()
    h.connect_uri(uri)

    def normal_writes(seconds: float, seed: int) -> None:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            h.pwrite(text_block(seed + i), ((seed + i) % 48) * MiB)
            h.flush()
            i += 1
            time.sleep(0.25)

    normal_writes(15, 100)  # the disk's own baseline: writes that compress
    assert sites.a.api("GET", "/v1/alerts")["active"] == []
    for i in range(16):  # ransomware: every block rewritten with random bytes
        h.pwrite(os.urandom(MiB), (i + 16) * MiB)
    h.flush()
    wait_for(lambda: any(a["alert"] == "anomaly" for a in
                         sites.a.api("GET", "/v1/alerts")["active"]), 30, "anomaly alert")
    # The alert is active at once; its event is told once the tagged checkpoint is cut
    # (acknowledged by site B, up to 10 s on a loaded machine).
    wait_for(lambda: find(events(sites.a), kind="alert", alert="anomaly", change="raised"),
             30, "the anomaly's raised event")
    [raised] = find(events(sites.a), kind="alert", alert="anomaly", change="raised")
    assert raised["severity"] == "error" and raised["anomaly_disk"] == "vda"
    assert raised["ratio"] >= 0.85 and raised["baseline"] <= 0.6
    assert raised["checkpoint_tag"].startswith("anomaly-vda-")
    cps = json.loads(sites.a.ferry("checkpoints", "g1", "--json").stdout)["source"]
    tagged = [c for c in cps if c["tag"] == raised["checkpoint_tag"]]
    assert tagged and tagged[0]["id"] == raised["checkpoint"]
    assert raised["restore_point"] in [c["id"] for c in cps]
    before = next(c for c in cps if c["id"] == raised["restore_point"])
    assert before["wall_ns"] < tagged[0]["wall_ns"]
    wait_for(lambda: find(hooked(sites.root), alert="anomaly", change="raised"), 30, "hook")
    normal_writes(20, 200)
    wait_for(lambda: find(events(sites.a), kind="alert", alert="anomaly", change="cleared"),
             30, "anomaly cleared")
    wait_for(lambda: find(hooked(sites.root), alert="anomaly", change="cleared"), 30,
             "hook of the clearing")
    h.shutdown()
    assert "ERROR ferry.alerts: ALERT anomaly raised" in sites.a.log.read_text()


def test_a_killed_splitter_raises_and_clears_splitter_restart(sites: Lab) -> None:
    disk = sites.image("vda.img", 8 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    time.sleep(1)
    assert not find(events(sites.a), kind="alert")  # starting splitters raise nothing
    sites.a.kill_splitters()
    wait_for(lambda: find(events(sites.a), kind="alert", alert="splitter-restart",
                          change="cleared"), 60, "splitter-restart raised and cleared")
    [raised] = find(events(sites.a), kind="alert", alert="splitter-restart", change="raised")
    assert raised["disk"] == "vda" and raised["severity"] == "warning"


def test_events_follow_outlives_an_agent_restart(sites: Lab) -> None:
    follower = subprocess.Popen([*FERRY, "--api", sites.a.api_url, "events", "--follow",
                                 "--json"], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(1)
        sites.a.stop()
        time.sleep(2)
        sites.a.start()
        disk = sites.image("vda.img", 4 * MiB)
        sites.protect("g1", disk)
        time.sleep(1.5)
    finally:
        follower.terminate()
        out, _ = follower.communicate(timeout=30)
    followed = [json.loads(line) for line in out.splitlines()]
    assert len(find(followed, kind="agent", change="started")) == 2
    assert find(followed, kind="group", change="protected", group="g1")
    ids = [e["id"] for e in followed]
    assert ids == sorted(set(ids))  # ids grow across the restart
    proc = subprocess.run([*FERRY, "--api", "unix:%s/none.sock" % sites.root, "events"],
                          cwd=REPO, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 5
