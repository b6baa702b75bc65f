"""Exports that outlive their starter (agent/target/exports.py, views.py), with real agents,
nbdkit and libnbd: a live failover's export still serves after trio has retired the worker
thread that started it, across two restores at once, and across a kill -9 and a normal stop
of site B's agent; a killed nbdkit is reported dead, and a live one is started again; views
and tests are taken back after a restart, and those whose nbdkit died are removed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Dict, List

from conftest import Lab, same_bytes
from test_pit import checkpoint_series, connect, read_all, wait_replicating

from lab.sites import FERRY, REPO

MiB = 1024 * 1024
THREAD_RETIRED = 10  # trio retires a worker thread idle for this long
RETIRED_MARGIN = 15  # waited past it


def pid_of(lab: Lab, vid: str, disk: str) -> int:
    return int((lab.b.data / "views" / vid / (disk + ".pid")).read_text())


def answers(uri: str) -> bool:
    return subprocess.run(["nbdinfo", "--size", uri], capture_output=True,
                          timeout=60).returncode == 0


def views_of(lab: Lab, group: str) -> List[Dict[str, Any]]:
    out: List[Dict[str, Any]] = lab.b.status(group)["replicas"][group]["views"]
    return out


def wait_for(what: str, check: Any, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.2)
    raise AssertionError("no %s within %g s" % (what, timeout))


def failed_over(lab: Lab) -> tuple:
    """g1 (one 8 MiB disk) replicated with two tagged checkpoints, then failed over live
    at the first; (saved checkpoints, the failover's JSON)."""
    disks = {"vda": lab.image("vda.img", 8 * MiB)}
    uris = lab.protect("g1", *disks.values())
    wait_replicating(lab, "g1")
    saved = checkpoint_series(lab, "g1", disks, uris, 2, seed=11)
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    out = json.loads(lab.b.ferry("failover", "g1", "--live", "--checkpoint", saved[0][0],
                                 "--json").stdout)
    return saved, out


def test_live_export_outlives_threads_restores_and_agent_restarts(sites: Lab) -> None:
    saved, out = failed_over(sites)
    uri = out["disks"]["vda"]
    h = connect(uri)
    h.pwrite(b"N" * 4096, 0)
    h.flush()
    h.shutdown()
    pid = pid_of(sites, "live-g1", "vda")

    # Two restores at once (each in its own worker threads) of a point before the failover.
    dests = [sites.work / ("r%d.img" % i) for i in range(2)]
    procs = [subprocess.Popen([*FERRY, "--api", sites.b.api_url, "restore", "g1", "--disk",
                               "vda", "--to", str(d), "--checkpoint", saved[0][0]],
                              cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
             for d in dests]
    for p in procs:
        assert p.wait(300) == 0, p.stderr.read() if p.stderr else ""
    restored = time.monotonic()
    for d in dests:
        assert same_bytes(d, saved[0][2]["vda"])
    assert answers(uri)

    # Past the retirement of every worker thread that started it (before the restores), or
    # that the restores used since (the last job of each was over by ``restored``).
    time.sleep(max(0.0, restored + THREAD_RETIRED + RETIRED_MARGIN - time.monotonic()))
    assert answers(uri) and read_all(uri, 4096) == b"N" * 4096
    assert pid_of(sites, "live-g1", "vda") == pid

    # kill -9 of site B's agent: the export serves while no agent runs, and is taken back.
    sites.b.kill()
    assert answers(uri) and read_all(uri, 4096) == b"N" * 4096
    sites.b.start()
    [live] = views_of(sites, "g1")
    assert live["live"] and live["state"] == "serving" and live["dead_disks"] == []
    assert pid_of(sites, "live-g1", "vda") == pid and "live export taken back" in \
        sites.b.log.read_text()
    # A normal stop too.
    sites.b.stop()
    assert answers(uri) and read_all(uri, 4096) == b"N" * 4096
    sites.b.start()
    assert pid_of(sites, "live-g1", "vda") == pid
    assert read_all(uri, 8 * MiB)[4096:] == saved[0][2]["vda"].read_bytes()[4096:]

    # A killed live export is started again, on the same socket, with its writes.
    os.kill(pid, signal.SIGKILL)
    wait_for("restarted live export",
             lambda: pid_of(sites, "live-g1", "vda") != pid and answers(uri))
    assert read_all(uri, 4096) == b"N" * 4096
    assert "the live export of vda died; starting it again" in sites.b.log.read_text()
    assert read_all(uri, 8 * MiB)[4096:] == saved[0][2]["vda"].read_bytes()[4096:]
    [live] = views_of(sites, "g1")
    assert live["state"] == "serving"

    # Killed while no agent runs: the next agent starts it again.
    sites.b.stop()
    os.kill(pid_of(sites, "live-g1", "vda"), signal.SIGKILL)
    wait_for("export gone", lambda: not answers(uri))
    sites.b.start()
    assert answers(uri) and read_all(uri, 4096) == b"N" * 4096


def test_views_and_tests_are_taken_back_and_dead_ones_reported(sites: Lab) -> None:
    disks = {"vda": sites.image("vda.img", 8 * MiB)}
    uris = sites.protect("g1", *disks.values())
    wait_replicating(sites, "g1")
    saved = checkpoint_series(sites, "g1", disks, uris, 2, seed=12)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    view = json.loads(sites.b.ferry("view", "g1", "--checkpoint", saved[0][0],
                                    "--json").stdout)
    other = json.loads(sites.b.ferry("view", "g1", "--checkpoint", saved[1][0],
                                     "--json").stdout)
    test = json.loads(sites.b.ferry("failover", "g1", "--test", "--checkpoint", saved[1][0],
                                    "--json").stdout)
    h = connect(test["disks"]["vda"])
    h.pwrite(b"T" * 4096, 0)
    h.flush()
    h.shutdown()
    desc = json.loads((sites.b.data / "views" / view["id"] / "view.json").read_text())
    assert desc["id"] == view["id"] and desc["disks"] == view["disks"]

    # Across a kill -9 of the agent: all three taken back, the test's write with it.
    sites.b.kill()
    sites.b.start()
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["views_open"] == 3
    assert {v["id"]: v["state"] for v in st["views"]} == {
        view["id"]: "serving", other["id"]: "serving", test["id"]: "serving"}
    assert st["test"]["id"] == test["id"]
    assert read_all(view["disks"]["vda"], 8 * MiB) == saved[0][2]["vda"].read_bytes()
    assert read_all(test["disks"]["vda"], 4096) == b"T" * 4096

    # A view whose nbdkit dies while the agent runs is reported dead (and stays so).
    os.kill(pid_of(sites, view["id"], "vda"), signal.SIGKILL)
    dead = wait_for("dead view", lambda: [v for v in views_of(sites, "g1")
                                          if v["id"] == view["id"] and v["state"] == "dead"])
    assert dead[0]["dead_disks"] == ["vda"]
    wait_for("its death logged", lambda: "view %s died" % view["id"]
             in sites.b.log.read_text())
    sites.b.ferry("view-close", view["id"])

    # One whose nbdkit died while no agent ran is removed at the next start, and unpinned.
    sites.b.stop()
    os.kill(pid_of(sites, other["id"], "vda"), signal.SIGKILL)
    wait_for("view gone", lambda: not answers(other["disks"]["vda"]))
    sites.b.start()
    st = sites.b.status("g1")["replicas"]["g1"]
    assert [v["id"] for v in st["views"]] == [test["id"]] and st["views_open"] == 1
    assert not (sites.b.data / "views" / other["id"]).exists()
    sites.b.ferry("failover", "g1", "--stop-test")
    assert sites.b.status("g1")["replicas"]["g1"]["views_open"] == 0
    assert not (sites.b.data / "views" / test["id"]).exists()


def test_a_pid_file_naming_another_process_is_not_taken(sites: Lab, tmp_path: Path) -> None:
    """A view directory left with a pid file that names some other process (a recycled
    pid) and no nbdkit: removed at start, and that process is left alone."""
    disks = {"vda": sites.image("vda.img", 8 * MiB)}
    uris = sites.protect("g1", *disks.values())
    wait_replicating(sites, "g1")
    saved = checkpoint_series(sites, "g1", disks, uris, 1, seed=13)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    view = json.loads(sites.b.ferry("view", "g1", "--checkpoint", saved[0][0],
                                    "--json").stdout)
    sites.b.stop()
    os.kill(pid_of(sites, view["id"], "vda"), signal.SIGKILL)
    wait_for("view gone", lambda: not answers(view["disks"]["vda"]))
    bystander = subprocess.Popen(["sleep", "300"])
    try:
        (sites.b.data / "views" / view["id"] / "vda.pid").write_text("%d\n" % bystander.pid)
        junk = sites.b.data / "views" / "junk"  # no view.json at all
        junk.mkdir()
        (junk / "vda.pid").write_text("%d\n" % bystander.pid)
        sites.b.start()
        assert bystander.poll() is None
        assert not (sites.b.data / "views" / view["id"]).exists() and not junk.exists()
        st = sites.b.status("g1")["replicas"]["g1"]
        assert st["views"] == [] and st["views_open"] == 0
    finally:
        bystander.kill()
        bystander.wait()


# -- Views on their own (no agent): taking back, watching, refusing ------------------------

def test_views_taken_back_watched_and_dropped(tmp_path: Path, caplog: Any) -> None:
    from test_pit_units import Model, fill, start

    from agent.target import exports
    from agent.target.views import Views
    model = Model(2)
    g = start(tmp_path / "g", model)
    ids = fill(g, model, 4, seed=14)
    g.failover_live(ids[2], None)
    data = str(tmp_path / "data")
    views = Views(data)
    live = views.serve_live(g)
    view = views.open(g, ids[1], None, test=False)
    assert g.pins == 1 and g.failover["exports"] == live["disks"]
    pids = {(v, d): pid_of_dir(Path(data), v, d) for v in (live["id"], view["id"])
            for d in ("a", "b")}
    views.release()  # the agent stops: nothing stops with it

    again = Views(data)
    assert again.pins_of("g") == 1 and again.pins_of("other") == 0
    again.adopt({"g": g})
    assert {v["id"]: v["state"] for v in again.of_group("g")} == {
        live["id"]: "serving", view["id"]: "serving"}
    assert {k: pid_of_dir(Path(data), *k) for k in pids} == pids
    assert read_all(view["disks"]["a"], 4096) == model.at[ids[1]][0][:4096]

    # A live disk that cannot start again: logged once, shown dead, tried every time.
    from agent.target import failover
    path = failover.live_path(g, "a")
    os.rename(path, path + ".away")
    os.kill(pids[(live["id"], "a")], signal.SIGKILL)
    wait_for("dead", lambda: not exports.is_ours(pids[(live["id"], "a")],
                                                 live["disks"]["a"].split("socket=")[1]))
    again.watch({"g": g})
    again.watch({"g": g})
    assert caplog.text.count("cannot restart its live export") == 1
    [st] = [v for v in again.of_group("g") if v["live"]]
    assert st["state"] == "dead" and st["dead_disks"] == ["a"]
    again.release()  # the same when an agent starts: taken back dead, logged once
    again = Views(data)
    again.adopt({"g": g})
    again.watch({"g": g})
    assert caplog.text.count("cannot restart its live export") == 2
    [st] = [v for v in again.of_group("g") if v["live"]]
    assert st["state"] == "dead" and st["dead_disks"] == ["a"]
    os.rename(path + ".away", path)
    again.watch({"g": g})
    [st] = [v for v in again.of_group("g") if v["live"]]
    assert st["state"] == "serving" and answers(live["disks"]["a"])
    again.release()

    # Its group no longer failed over (a rollback cut short), or gone: dropped, stopped.
    g.failover_rollback()
    third = Views(data)
    third.adopt({"g": g})
    assert [v["id"] for v in third.of_group("g")] == [view["id"]]
    assert not answers(live["disks"]["a"]) and not (Path(data) / "views" / live["id"]).exists()
    third.release()
    g.pins = 0
    fourth = Views(data)
    fourth.adopt({})
    assert fourth.views == {} and not answers(view["disks"]["a"])
    assert "view %s is not held here; removing it" % view["id"] in caplog.text
    assert os.listdir(Path(data) / "views") == []
    g.close()


def pid_of_dir(data: Path, vid: str, disk: str) -> int:
    return int((data / "views" / vid / (disk + ".pid")).read_text())
