"""Long operations as jobs on the agent: detach and reattach, progress, failures with their
exit status, a CLI that loses the agent."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import time

import pytest
from conftest import Lab, same_bytes

from agent.errors import EXIT_CONFLICT, EXIT_NOT_FOUND, Invalid, NotFound
from lab.sites import FERRY, REPO

MiB = 1024 * 1024


def random_image(sites: Lab, size: int) -> os.PathLike:
    disk = sites.image("vda.img", size)
    with open(disk, "r+b") as f:
        f.write(os.urandom(size))
    return disk


def test_restore_detached_then_reattached(sites: Lab) -> None:
    disk = random_image(sites, 16 * MiB)
    sites.protect("g1", disk)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    dest = sites.work / "r.img"
    job_id = sites.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest),
                           "--detach").stdout.strip()
    assert job_id.startswith("j")
    result = json.loads(sites.b.ferry("job", job_id, "--wait", "--json").stdout)
    assert result["state"] == "done" and result["kind"] == "restore"
    assert result["result"]["to"] == str(dest) and same_bytes(disk, dest)
    listed = json.loads(sites.b.ferry("jobs", "--json").stdout)["jobs"]
    assert [j["id"] for j in listed] == [job_id]
    assert job_id in sites.b.ferry("jobs").stdout
    # A restore onto an existing file fails in its job, with the conflict's exit status.
    proc = sites.b.ferry("restore", "g1", "--disk", "vda", "--to", str(dest), check=False)
    assert proc.returncode == EXIT_CONFLICT and "already exists" in proc.stderr
    failed = [j for j in json.loads(sites.b.ferry("jobs", "--json").stdout)["jobs"]
              if j["state"] == "failed"]
    assert failed[0]["error"]["kind"] == "Conflict"
    assert "already exists" in sites.b.ferry("jobs").stdout
    proc = sites.b.ferry("job", "jnosuch", check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "no job jnosuch" in proc.stderr
    # Names are checked before a job starts.
    proc = sites.b.ferry("restore", "g1", "--disk", "nope", "--to", str(dest) + "2",
                         check=False)
    assert proc.returncode == EXIT_NOT_FOUND and "has no disk nope" in proc.stderr
    proc = sites.b.ferry("restore", "nosuch", "--disk", "vda", "--to", str(dest) + "2",
                         check=False)
    assert proc.returncode == EXIT_NOT_FOUND
    events = [json.loads(x) for x in sites.b.ferry("events", "--json").stdout.splitlines()]
    assert [e["change"] for e in events if e["kind"] == "job"][:2] == ["started", "done"]


def test_jobs_endpoint_bounds(sites: Lab) -> None:
    for body in ({"kind": "dance", "group": "g1"}, {"kind": "wait"},
                 {"kind": "wait", "group": "g1", "timeout": "x"}):
        with pytest.raises((Invalid, NotFound)):
            sites.a.api("POST", "/v1/jobs", body)
    with pytest.raises(NotFound):
        sites.a.api("POST", "/v1/jobs", {"kind": "wait", "group": "nosuch"})
    with pytest.raises(NotFound):
        sites.a.api("POST", "/v1/jobs", {"kind": "failover", "group": "nosuch",
                                         "mode": "test"})
    for query in ("wait=x", "wait=61"):
        with pytest.raises(Invalid):
            sites.a.api("GET", "/v1/jobs/jx?" + query)
    with pytest.raises(NotFound):
        sites.a.api("DELETE", "/v1/jobs")


def test_wait_survives_the_cli_going_away_and_shows_progress(sites: Lab) -> None:
    disk = random_image(sites, 24 * MiB)
    sites.protect("g1", disk, extra=("--bandwidth", "3M"))
    # On a terminal, --progress draws a bar with the part delivered to site B and an ETA.
    master, slave = pty.openpty()
    proc = subprocess.Popen([*FERRY, "--api", sites.a.api_url, "wait", "g1", "--synced",
                             "--progress"], cwd=REPO, stdout=subprocess.PIPE, stderr=slave)
    os.close(slave)
    drawn = b""
    deadline = time.monotonic() + 60
    while b"ETA" not in drawn and time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 1)
        if ready:
            try:
                drawn += os.read(master, 4096)
            except OSError:  # EIO: the CLI has closed the terminal (it ended)
                break
    assert proc.poll() is None, (drawn, proc.communicate())
    status = sites.a.ferry("status").stdout
    assert "delivered to the target, ETA" in status, status
    proc.kill()  # the CLI goes away; the job goes on on the agent
    proc.wait()
    os.close(master)
    assert b"syncing g1 [" in drawn and b"ETA" in drawn, drawn
    running = [j for j in json.loads(sites.a.ferry("jobs", "--json").stdout)["jobs"]
               if j["state"] == "running"]
    assert len(running) == 1 and running[0]["kind"] == "wait"
    p = running[0]["progress"]
    assert p is not None and 0 <= p["progress"] < 1 and p["total_bytes"] > 0
    again = sites.a.ferry("job", running[0]["id"], "--wait", timeout=120)
    assert running[0]["id"] in again.stdout and "done" in again.stdout


def test_a_cli_that_loses_the_agent_says_so(sites: Lab) -> None:
    disk = random_image(sites, 16 * MiB)
    sites.protect("g1", disk, extra=("--bandwidth", "1M"))
    proc = subprocess.Popen([*FERRY, "--api", sites.a.api_url, "wait", "g1", "--synced"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    time.sleep(2)
    sites.a.stop()  # the agent restarts: its jobs are gone, the CLI says so when back
    time.sleep(2)
    sites.a.start()
    _out, err = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_NOT_FOUND and "no job" in err, err


def test_json_on_every_command_that_changes_something(sites: Lab) -> None:
    """--json everywhere: the agent's answer, parseable, for the commands that printed
    only a sentence before."""
    def j(site, *args: str):  # type: ignore[no-untyped-def]
        return json.loads(site.ferry(*args, "--json").stdout)

    disk = sites.image("vda.img", 4 * MiB)
    sites.protect("g1", disk)
    assert j(sites.a, "wait", "g1", "--synced")["synced"] is True
    assert j(sites.a, "checkpoint", "g1", "--tag", "t1")["tag"] == "t1"
    assert j(sites.a, "pause", "g1")["paused"] is True
    assert j(sites.a, "resume", "g1")["paused"] is False
    assert j(sites.a, "set", "g1", "--bandwidth", "10M")["bandwidth"] == 10 * MiB
    view = j(sites.b, "view", "g1")
    assert j(sites.b, "view-close", view["id"])["id"] == view["id"]
    test = j(sites.b, "failover", "g1", "--test")
    assert test["id"]
    assert j(sites.b, "failover", "g1", "--stop-test")["id"] == test["id"]
    dest = sites.work / "r.img"
    assert j(sites.b, "restore", "g1", "--disk", "vda", "--to", str(dest))["to"] == str(dest)
    assert j(sites.a, "alerts")["active"] == []
    assert "urls" not in j(sites.a, "jobs")
    assert j(sites.a, "unprotect", "g1")
