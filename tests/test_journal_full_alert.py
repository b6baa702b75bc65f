"""The ``journal-full`` alert is raised where the journal refuses, not found by sampling:
site B's file system fills for a moment only (freed as soon as site B has refused once),
again and again, and every time both sites raise the alert and clear it once B takes
writes again. (The watcher samples status every 0.5 s: a state that lasts less than that
may never be seen in a sample.)"""

from __future__ import annotations

import json
from typing import Any, Dict, List

from conftest import Lab
from test_faults import wait_for
from test_fill import fill, small_b  # noqa: F401 (a fixture)

from agent.alerts import REFUSED_HOLD, Alerts
from lab.oracle import OracleWriter, check

MiB = 1024 * 1024
ROUNDS = 3


def alerts(site: Any, change: str) -> List[Dict[str, Any]]:
    events = [json.loads(x) for x in site.ferry("events", "--json").stdout.splitlines()]
    return [e for e in events if e.get("kind") == "alert" and e.get("alert") == "journal-full"
            and e.get("change") == change]


def refusals(lab: Lab) -> int:
    """Site B's log lines for a refused write: where the refusal is seen first."""
    return lab.b.log.read_text(errors="replace").count("journal full: site B's file system")


def test_a_brief_fill_raises_journal_full_every_time(small_b: Lab) -> None:  # noqa: F811
    lab = small_b
    lab.b.start()
    lab.a.start()
    disk = lab.image("vda.img", 8 * MiB)
    uris = lab.protect("g1", disk, extra=("--history", "5s"))
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    writer = OracleWriter(uris, 8 * MiB, seed=31, blocks=1024, pause=0.003)
    writer.start()
    try:
        for n in range(1, ROUNDS + 1):
            wait_for(lambda n=n: writer.log.acked > 100 * n, what="the writer to write")
            before = refusals(lab)
            ballast = fill(lab.b.data)
            wait_for(lambda before=before: refusals(lab) > before, timeout=60,
                     what="site B to refuse")
            ballast.unlink()  # full for as long as one refusal took
            wait_for(lambda n=n: len(alerts(lab.a, "cleared")) >= n, timeout=90,
                     what="site A's journal-full alert %d to clear" % n)
            wait_for(lambda n=n: len(alerts(lab.b, "cleared")) >= n, timeout=30,
                     what="site B's journal-full alert %d to clear" % n)
    finally:
        barrier = writer.finish()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    v = check({"vda": str(lab.restore("g1", "vda"))}, writer.log, barrier)
    assert v.prefix == writer.log.acked, v
    for site, side in ((lab.a, "source"), (lab.b, "target")):
        raised = alerts(site, "raised")
        assert len(raised) == ROUNDS and len(alerts(site, "cleared")) == ROUNDS, raised
        assert all(a["severity"] == "error" and a["group"] == "g1" and a["side"] == side
                   and "file system is full" in a["message"] for a in raised), raised
    events = [json.loads(x) for x in lab.a.ferry("events", "--json").stdout.splitlines()]
    sampled = sum(1 for e in events if e.get("new") == "journal-full")
    print("\njournal full %d times, each for one refusal: %d alerts raised and cleared on "
          "each site; the sampled state change was seen %d time(s); oracle prefix %d"
          % (ROUNDS, ROUNDS, sampled, v.prefix))


def replica(storage_error: Any = None, journal: int = 0) -> Dict[str, Any]:
    return {"checkpoints": 5, "history_s": 100, "history_covered_s": 100,
            "history_short": False, "journal_bytes": journal, "journal_max": 100,
            "storage_error": storage_error}


def names(transitions: Any) -> list:
    return [(c, a["alert"], a["severity"], a.get("side")) for c, a in transitions]


def test_refusals_raise_once_and_clear_on_the_next_write() -> None:
    """The rules behind the test above, without agents: a refusal raises at once, more
    refusals add nothing, the source's ``resumed`` clears; on site B a status without a
    storage error clears, but not one sampled within ``REFUSED_HOLD`` of a refusal (it may
    have been asked for before the refusal), and the journal's size rule waits meanwhile."""
    al = Alerts()
    assert names(al.refused("g", "source", "full", 0)) == [
        ("raised", "journal-full", "error", "source")]
    assert al.refused("g", "source", "full", 1) == []
    assert names(al.resumed("g", "source", 2)) == [
        ("cleared", "journal-full", "error", "source")]
    assert al.resumed("g", "source", 3) == []
    st: Dict[str, Any] = {"groups": {}, "replicas": {"g": replica()}}
    assert names(al.update(st, 10)) == []
    assert names(al.refused("g", "target", "full", 10)) == [
        ("raised", "journal-full", "error", "target")]
    st["replicas"]["g"] = replica(journal=95)  # stale: no error yet, and near the size cap
    assert names(al.update(st, 10 + REFUSED_HOLD / 2)) == []
    st["replicas"]["g"] = replica({"errno_name": "ENOSPC"}, journal=95)
    assert names(al.update(st, 20)) == []
    st["replicas"]["g"] = replica(journal=50)
    assert names(al.update(st, 21)) == [("cleared", "journal-full", "error", "target")]
    assert names(al.update(st, 22)) == []
    # A group removed while refused leaves nothing behind.
    al.refused("g", "target", "full", 30)
    assert names(al.update({"groups": {}, "replicas": {}}, 31)) == [
        ("cleared", "journal-full", "error", "target")]
    st["replicas"]["g"] = replica(journal=95)
    assert names(al.update(st, 40)) == [("raised", "journal-full", "warning", None)]
