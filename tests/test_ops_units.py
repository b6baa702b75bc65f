"""The watcher, the job runner and the listener policies, in one trio run each: their error
branches made to run (a failing hook, a slow hook, a failing sample, a failing checkpoint, a
failing job, too many jobs, a missing cookie header), without agents."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, List, Tuple

import pytest
import trio

from agent import jobs as jobs_mod
from agent import watch as watch_mod
from agent.access import Guard
from agent.alerts import Alerts
from agent.errors import Conflict, NotFound, Unavailable
from agent.events import EventLog
from agent.jobs import Jobs
from agent.watch import Watcher


def empty() -> Dict[str, Any]:
    return {"site": "t", "uptime_seconds": 0, "groups": {}, "replicas": {}}


def hook(directory: Path, name: str, body: str) -> Path:
    path = directory / name
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


async def test_hooks_that_fail_or_hang_are_counted_and_logged(tmp_path: Path,
                                                              monkeypatch: Any,
                                                              caplog: Any) -> None:
    monkeypatch.setattr(watch_mod, "HOOK_TIMEOUT", 0.5)
    out = tmp_path / "out"
    hook(tmp_path, "10-fails", "echo broken >&2; exit 3\n")
    hook(tmp_path, "20-hangs", "sleep 30\n")
    hook(tmp_path, "30-records", "cat > %s\n" % out)
    (tmp_path / "40-dir").mkdir()
    (tmp_path / ".hidden").write_text("#!/bin/sh\n")
    w = Watcher(empty, EventLog(), Alerts(), str(tmp_path))
    assert [os.path.basename(p) for p in w.hooks()] == ["10-fails", "20-hangs", "30-records"]
    await w._hooks({"id": 1, "kind": "alert"})
    assert w.hook_runs == 3 and w.hook_failures == 2
    assert json.loads(out.read_text()) == {"id": 1, "kind": "alert"}
    assert "10-fails failed (exit 3): broken" in caplog.text
    assert "20-hangs did not finish" in caplog.text
    missing = Watcher(empty, EventLog(), Alerts(), str(tmp_path / "nope"))
    assert missing.hooks() == []
    assert Watcher(empty, EventLog(), Alerts(), None).hooks() == []


async def test_a_hook_that_cannot_run(tmp_path: Path, caplog: Any) -> None:
    bad = tmp_path / "10-noexec"
    bad.write_text("not a program")
    bad.chmod(0o755)
    w = Watcher(empty, EventLog(), Alerts(), str(tmp_path))
    await w._hooks({"id": 1})
    assert w.hook_failures == 1 and "cannot run" in caplog.text


async def test_a_failing_sample_is_logged_and_the_watcher_goes_on(caplog: Any) -> None:
    calls: List[int] = []

    def status() -> Dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise KeyError("boom")
        return empty()

    w = Watcher(status, EventLog(), Alerts())
    with trio.move_on_after(1.2):
        await w.run()
    assert len(calls) >= 2 and "the watcher failed to sample" in caplog.text


async def test_anomaly_whose_checkpoint_cannot_be_cut(caplog: Any) -> None:
    events = EventLog()

    async def checkpoint(group: str, tag: str, seconds: float) -> Dict[str, Any]:
        raise Conflict("group %s is not replicating" % group)

    def checkpoints(group: str) -> List[Dict[str, Any]]:
        raise NotFound("no group %s" % group)

    w = Watcher(empty, events, Alerts(), None, checkpoint, checkpoints)
    await w._anomaly({"alert": "anomaly", "group": "g", "severity": "error", "message": "m",
                      "since": 0, "anomaly_disk": "vda", "window_start": 0})
    [raised] = events.latest(1, "alert")
    assert raised["checkpoint_error"] == "group g is not replicating"
    assert "cannot list its checkpoints" in caplog.text


def test_alert_settings_survive_and_a_bad_file_is_told(tmp_path: Path, caplog: Any) -> None:
    path = str(tmp_path / "alerts.json")
    w = Watcher(empty, EventLog(), Alerts(), settings_path=path)
    assert w.set_rpo_alert("g", 30.0) == {"group": "g", "rpo_alert": 30.0}
    assert Watcher(empty, EventLog(), Alerts(), settings_path=path).alerts.rpo == {"g": 30.0}
    assert w.set_rpo_alert("g", None)["rpo_alert"] is None
    Path(path).write_text("{not json")
    assert Watcher(empty, EventLog(), Alerts(), settings_path=path).alerts.rpo == {}
    assert "alert settings start empty" in caplog.text


async def test_jobs_fail_with_their_error_and_are_bounded(monkeypatch: Any) -> None:
    events = EventLog()
    jobs = Jobs(events)
    with pytest.raises(Unavailable):
        jobs.start("restore", "g", trio.sleep_forever)
    async with trio.open_nursery() as nursery:
        await nursery.start(jobs.run)

        async def fails() -> None:
            raise NotFound("no checkpoint x")

        async def io_error() -> None:
            raise OSError(28, "No space left on device")

        def broken_progress() -> Dict[str, Any]:
            raise FileNotFoundError("gone")

        a = jobs.start("restore", "g", fails)
        b = jobs.start("restore", "g", io_error)
        assert (await jobs.wait(a["id"], 5))["error"] == {"error": "no checkpoint x",
                                                          "kind": "NotFound"}
        assert (await jobs.wait(b["id"], 5))["error"]["error"].startswith("OSError")
        monkeypatch.setattr(jobs_mod, "MAX_RUNNING", 1)
        c = jobs.start("wait", "g", trio.sleep_forever, broken_progress)
        assert jobs.get(c["id"])["progress"] is None
        with pytest.raises(Conflict):
            jobs.start("wait", "g", trio.sleep_forever)
        assert (await jobs.wait(c["id"], 0.1))["state"] == "running"
        with pytest.raises(NotFound):
            await jobs.wait("jnosuch", 1)
        nursery.cancel_scope.cancel()
    assert [e["change"] for e in events.latest(10, "job")][:4] == ["started", "started",
                                                                   "failed", "failed"]


async def asgi(app: Any, method: str, path: str, headers: List[Tuple[bytes, bytes]]
               ) -> Tuple[int, Dict[bytes, bytes], bytes]:
    sent: List[Dict[str, Any]] = []

    async def receive() -> Dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": headers,
               "query_string": b""}, receive, send)
    return sent[0]["status"], dict(sent[0].get("headers", [])), sent[-1].get("body", b"")


async def ok_app(scope: Dict[str, Any], receive: Any, send: Any) -> None:
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": scope["ferry_policy"].encode()})


async def test_token_policy_cookie_and_csrf() -> None:
    guard = Guard(ok_app, "token", "t" * 32)
    cookie = (b"cookie", b"ferry_token=" + b"t" * 32)
    assert (await asgi(guard, "GET", "/v1/status", [cookie]))[0] == 200
    status, _h, body = await asgi(guard, "POST", "/v1/groups/g/pause", [cookie])
    assert status == 403 and b"x-ferry" in body
    assert (await asgi(guard, "POST", "/v1/groups/g/pause",
                       [cookie, (b"x-ferry", b"1")]))[0] == 200
    assert (await asgi(guard, "POST", "/v1/groups/g/pause",
                       [(b"authorization", b"Bearer " + b"t" * 32)]))[0] == 200
    assert (await asgi(guard, "GET", "/v1/status", [(b"cookie", b"\x00;;=bad")]))[0] == 401
    status, headers, body = await asgi(guard, "GET", "/", [])
    assert status == 401 and b"ferry dashboard-url" in body
    status, headers, _ = await asgi(guard, "GET", "/v1/status",
                                    [(b"authorization", b"Bearer wrong")])
    assert status == 401 and headers[b"www-authenticate"] == b"Bearer"
    cert = Guard(ok_app, "cert")
    assert (await asgi(cert, "POST", "/v1/x", []))[2] == b"cert"


async def test_api_without_its_watcher_and_jobs_and_bad_alert_settings() -> None:
    from agent.api import Api
    from agent.errors import Invalid
    api = Api(None, None, "t", None)  # type: ignore[arg-type]  # no engine needed here
    for path in ("/v1/alerts", "/v1/overview", "/v1/events", "/v1/jobs"):
        with pytest.raises(Unavailable):
            await api._route("GET", path, {}, {})
    for body in ({}, {"rpo_alert": 5, "x": 1}, {"rpo_alert": -1}, {"rpo_alert": True},
                 {"rpo_alert": "5s"}):
        with pytest.raises(Invalid):
            await api._route("POST", "/v1/groups/g/alerts", {}, body)
    api._policy = "token"
    with pytest.raises(Exception, match="local socket only"):
        await api._route("GET", "/v1/dashboard-url", {}, {})


async def test_a_sample_that_races_a_change_is_skipped(caplog: Any) -> None:
    calls: List[int] = []

    async def status() -> Dict[str, Any]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("dictionary changed size during iteration")
        return empty()

    w = Watcher(empty, EventLog(), Alerts(), status_async=status)
    with trio.move_on_after(1.2):
        await w.run()
    assert len(calls) >= 2 and "status sample skipped" in caplog.text


def test_rpo_history_keeps_the_worst_of_each_interval() -> None:
    def status(rpo: float) -> Dict[str, Any]:
        return {"site": "t", "uptime_seconds": 0, "replicas": {}, "groups": {"g": {
            "state": "replicating", "rpo_seconds": rpo, "bytes_sent": 0, "target": "b",
            "error": None, "disks": {}}}}

    w = Watcher(empty, EventLog(), Alerts())
    for t, rpo in ((100.0, 0.0), (101.0, 7.5), (102.0, 0.2), (105.5, 0.1), (106.0, 0.0)):
        w.sample(t, status(rpo))
    assert w.rpo_history("g") == [(100.0, 0.0), (105.5, 7.5)]
    w.sample(107.0, {"site": "t", "uptime_seconds": 0, "replicas": {}, "groups": {}})
    assert w.rpo_history("g") == [] and w.rates() == {}
