"""The alert rules, the event log and the journald priorities, without agents."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from typing import Any, Dict

import trio

from agent import alerts as A
from agent.alerts import Alerts, Detector
from agent.events import EventLog
from agent.logs import JournalFormatter, priority

MiB = 1 << 20


def source(state: str = "replicating", rpo: float = 0.0, sent: int = 0, shipped: int = 0,
           gen: int = 1, error: Any = None) -> Dict[str, Any]:
    return {"state": state, "rpo_seconds": rpo, "bytes_sent": sent, "target": "b:4005",
            "error": error, "disks": {"vda": {"state": state, "generation": gen,
                                              "bytes_shipped": shipped}}}


def replica(covered: float, window: float = 100, short: bool = True, journal: int = 0,
            limit: int = 100) -> Dict[str, Any]:
    return {"checkpoints": 5, "history_s": window, "history_covered_s": covered,
            "history_short": short, "journal_bytes": journal, "journal_max": limit}


def names(transitions: Any) -> list:
    return [(c, a["alert"], a["severity"]) for c, a in transitions]


def test_history_below_85_and_75_percent_of_the_window() -> None:
    al = Alerts()
    st: Dict[str, Any] = {"groups": {}, "replicas": {"g": replica(90)}}
    assert names(al.update(st, 0)) == []
    st["replicas"]["g"] = replica(80)
    assert names(al.update(st, 1)) == [("raised", "history", "warning")]
    st["replicas"]["g"] = replica(70)
    assert names(al.update(st, 2)) == [("raised", "history", "error")]
    st["replicas"]["g"] = replica(70, short=False)   # the window is still filling: no alert
    assert names(al.update(st, 3)) == [("cleared", "history", "error")]


def test_journal_near_its_cap_with_hysteresis() -> None:
    al = Alerts()
    st: Dict[str, Any] = {"groups": {}, "replicas": {"g": replica(100, short=False,
                                                                    journal=91)}}
    assert names(al.update(st, 0)) == [("raised", "journal-full", "warning")]
    st["replicas"]["g"]["journal_bytes"] = 87
    assert names(al.update(st, 1)) == []
    st["replicas"]["g"]["journal_bytes"] = 80
    assert names(al.update(st, 2)) == [("cleared", "journal-full", "warning")]
    st["replicas"]["g"] = {"error": "broken", "connected": False, "disks": {},
                           "journal_bytes": 0}  # a group the agent could not open
    assert names(al.update(st, 3)) == []


def test_link_down_after_n_seconds_and_a_gone_group_clears() -> None:
    al = Alerts(link_down_s=10)
    down = {"groups": {"g": source("target-unreachable", error="refused")}, "replicas": {}}
    assert names(al.update(down, 0)) == []
    assert names(al.update(down, 11)) == [("raised", "link-down", "error")]
    assert names(al.update({"groups": {}, "replicas": {}}, 12)) == [
        ("cleared", "link-down", "error")]


def test_splitter_restart_raised_and_cleared() -> None:
    al = Alerts()
    assert names(al.update({"groups": {"g": source(gen=5)}, "replicas": {}}, 0)) == []
    assert names(al.update({"groups": {"g": source("splitter-down", gen=5)},
                            "replicas": {}}, 1)) == [("raised", "splitter-restart",
                                                      "warning")]
    back = {"groups": {"g": source("replicating", gen=9)}, "replicas": {}}
    assert names(al.update(back, 2)) == []  # the new generation is the restart itself
    assert names(al.update(back, 3)) == [("cleared", "splitter-restart", "warning")]
    # A splitter starting (first seen down, no generation yet) is an alert only after 10 s.
    starting = Alerts()
    down = {"groups": {"g": source("splitter-down", gen=0)}, "replicas": {}}
    assert names(starting.update(down, 0)) == []
    assert names(starting.update(down, 5)) == []
    assert names(starting.update(down, 11)) == [("raised", "splitter-restart", "warning")]
    al2 = Alerts()
    al2.update({"groups": {"g": source(gen=5)}, "replicas": {}}, 0)
    assert names(al2.update({"groups": {"g": source("resyncing", gen=6)}, "replicas": {}},
                            1)) == [("raised", "splitter-restart", "warning")]


def test_detector_needs_a_baseline_and_volume() -> None:
    det = Detector()
    t, sent, shipped = 0.0, 0, 0
    # Incompressible from the start: no baseline, no alert (a disk of media files).
    for _ in range(40):
        t, sent, shipped = t + 0.5, sent + 4 * MiB, shipped + 4 * MiB
        assert det.judge(t, det.feed(t, sent, {"vda": shipped})) is None
    assert det.baseline is None
    # Idle windows do not count; a restarted agent's counters going back are skipped.
    det2 = Detector()
    assert det2.feed(0, 100, {"vda": 0}) is None
    assert det2.feed(5, 50, {"vda": 0}) is None


def test_detector_raises_and_clears() -> None:
    det = Detector()
    t, sent, shipped = 0.0, 0, 0
    verdicts = []

    def run(seconds: float, rate: int, ratio: float) -> None:
        nonlocal t, sent, shipped
        for _ in range(int(seconds / 0.5)):
            t += 0.5
            shipped += rate // 2
            sent += int(rate // 2 * ratio)
            v = det.judge(t, det.feed(t, sent, {"vda": shipped}))
            if v:
                verdicts.append((round(t, 1), v))

    run(20, 2 * MiB, 0.3)
    assert verdicts == [] and det.baseline_n >= A.BASELINE
    run(4, 8 * MiB, 1.0)
    assert [v for _t, v in verdicts] == ["raise"]
    run(30, 2 * MiB, 0.3)
    assert [v for _t, v in verdicts] == ["raise", "clear"]


def test_event_log_ids_grow_and_lost_is_told() -> None:
    clock = iter(range(1000, 2000)).__next__
    log = EventLog(keep=3, clock=lambda: float(clock()))
    first = log.emit("agent", change="started")["id"]
    for i in range(5):
        log.emit("disk", group="g", n=i)
    items, lost = log.since(first, 10)
    assert lost and [e["n"] for e in items] == [2, 3, 4]
    items, lost = log.since(0, 10)  # from before this agent: not "lost"
    assert not lost and len(items) == 3
    assert log.counts == {"agent": 1, "disk": 5}

    async def waiting() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lambda: log.wait(log.last_id, 5))
            await trio.sleep(0.1)
            log.emit("link", group="g", change="up")
        assert log.latest(1)[0]["kind"] == "link"
        got, _ = await log.wait(log.last_id, 0.05)
        assert got == []

    trio.run(waiting)


def test_journald_priorities() -> None:
    assert [priority(x) for x in (logging.DEBUG, logging.INFO, logging.WARNING,
                                  logging.ERROR, logging.CRITICAL)] == [7, 6, 4, 3, 2]
    record = logging.LogRecord("ferry.alerts", logging.WARNING, __file__, 1,
                               "ALERT %s\nsecond", ("rpo",), None)
    assert JournalFormatter().format(record) == "<4>ferry.alerts: ALERT rpo\n<4>second"


def test_journald_format_only_when_stderr_is_the_journal(tmp_path: Any) -> None:
    code = ("import logging, sys; from agent import logs; logs.setup(logging.INFO); "
            "logging.getLogger('ferry.x').warning('hello')")
    err = tmp_path / "err"
    with open(err, "w") as f:
        st = os.fstat(f.fileno())
        env = dict(os.environ, JOURNAL_STREAM="%d:%d" % (st.st_dev, st.st_ino))
        subprocess.run([sys.executable, "-c", code], stderr=f, env=env, check=True,
                       cwd=os.path.dirname(os.path.dirname(__file__)))
    assert err.read_text() == "<4>ferry.x: hello\n"
    env = dict(os.environ, JOURNAL_STREAM="1:2")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=env, check=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.stderr.endswith("WARNING ferry.x: hello\n")
