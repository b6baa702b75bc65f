"""A live failover as a persisted state machine (agent/target/failover.py): its table, each
step cut short by a crash and finished at the next open, and, with real agents, each
transition and each refused one: points after a live failover, commit, rollback (checked
byte for byte against the source), all across restarts of site B's agent."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest
from conftest import Lab, first_difference, same_bytes
from test_exports import answers, pid_of
from test_pit import (
    checkpoint_series,
    connect,
    read_all,
    restore_to,
    scribble,
    wait_replicating,
)
from test_pit_units import Model, fill, open_group, replica, start

from agent.errors import EXIT_CONFLICT, EXIT_USAGE, Conflict, IllegalTransition, Invalid
from agent.target import exports, failover, meta
from agent.target.failover import FAILOVER, Event, State
from agent.target.group import GroupState

MiB = 1024 * 1024


# -- the table and crashes, as plain logic -------------------------------------------------

def test_the_table() -> None:
    steps = [(State.NONE, Event.START, State.APPLYING),
             (State.APPLYING, Event.APPLIED, State.DONE),
             (State.DONE, Event.COMMIT, State.COMMITTING),
             (State.COMMITTING, Event.COMMITTED, State.COMMITTED),
             (State.DONE, Event.ROLLBACK, State.ROLLING_BACK),
             (State.ROLLING_BACK, Event.ROLLED_BACK, State.NONE),
             (State.APPLYING, Event.ABANDONED, State.NONE)]
    for state, event, nxt in steps:
        assert FAILOVER.step(state, event) is nxt
    legal = {(s, e) for s, e, _ in steps}
    for state in State:
        for event in Event:
            if (state, event) not in legal:
                with pytest.raises(IllegalTransition):
                    FAILOVER.step(state, event)
    assert failover.STATES == set(meta.FAILOVER_STATES)


def failed_over_group(tmp_path: Path) -> tuple:
    model = Model(2)
    g = start(tmp_path / "g", model)
    ids = fill(g, model, 8, seed=31)
    before = [replica(g, "a"), replica(g, "b")]
    g.failover_live(ids[3], None)
    return g, model, ids, before


def test_commit_cut_short_is_finished_at_open(tmp_path: Path) -> None:
    g, model, ids, _before = failed_over_group(tmp_path)
    with open(failover.live_path(g, "a"), "r+b") as f:
        f.write(b"L" * 512)  # a live write: never in the replica
    g.failover["state"] = "committing"  # as commit saves it before it starts
    g.save_meta()
    g.close()
    g = open_group(tmp_path / "g")
    assert g.failover is not None and g.failover["state"] == "committed"
    assert replica(g, "a") == model.at[ids[3]][0] and replica(g, "b") == model.at[ids[3]][1]
    assert g.checkpoints == [] and g.state is GroupState.FAILED_OVER
    with pytest.raises(Conflict, match="discarded by the commit"):
        g.restore("a", str(tmp_path / "r"), ids[2])
    with pytest.raises(Conflict, match="cannot be rolled back"):
        g.failover_rollback()
    with pytest.raises(Conflict, match="nothing to commit"):
        g.failover_commit()
    g.close()
    g = open_group(tmp_path / "g")  # and once more: nothing moves
    assert replica(g, "a") == model.at[ids[3]][0]
    assert Path(failover.live_path(g, "a")).read_bytes()[:512] == b"L" * 512
    g.close()


def test_commit_cut_short_after_half_the_journal_went_is_finished_at_open(
        tmp_path: Path) -> None:
    """The replicas at the cut and saved so, then a crash halfway through the deletion of
    the segments: the next open applies nothing again and deletes the rest."""
    from agent.target.restore import write_overlay
    g, model, ids, _before = failed_over_group(tmp_path)
    cut = [tuple(p) for p in g.failover["cut"]]
    g.failover["state"] = "committing"
    g.save_meta()
    for i, fd in enumerate(g.fds):
        write_overlay(g, fd, i, cut[i])
        os.fdatasync(fd)
    for st, p in zip(g.disks, cut):
        st.applied_gen, st.applied_seq = p
    g.save_meta(synced=True)
    segments = g.journal.segments()
    assert len(segments) > 2
    g.journal.drop_before(segments[len(segments) // 2])
    g.close()
    g = open_group(tmp_path / "g")
    assert g.failover is not None and g.failover["state"] == "committed"
    assert replica(g, "a") == model.at[ids[3]][0] and replica(g, "b") == model.at[ids[3]][1]
    assert g.checkpoints == [] and len(g.journal.segments()) == 1
    g.close()


def test_rollback_cut_short_is_finished_at_open(tmp_path: Path) -> None:
    g, model, ids, before = failed_over_group(tmp_path)
    with pytest.raises(Conflict, match="close them"):
        g.pins = 1
        g.failover_commit()
    g.pins = 0
    g.failover_rollback()
    assert g.failover is not None and g.failover["state"] == "rolling-back"
    g.close()
    g = open_group(tmp_path / "g")
    assert g.failover is None and g.state is GroupState.RECEIVING
    assert not os.path.exists(tmp_path / "g" / "live")
    assert [replica(g, "a"), replica(g, "b")] == before  # the replicas never moved
    for cid in ids:  # every point, before and after the failover's, as it was
        assert g.restore("a", str(tmp_path / cid), cid)["checkpoint"]["id"] == cid
        assert (tmp_path / cid).read_bytes() == model.at[cid][0]
    g.accept([model.write(0, 0, b"after")])  # it replicates again
    with pytest.raises(Conflict, match="not failed over"):
        g.failover_rollback()
    with pytest.raises(Conflict, match="not failed over"):
        g.failover_commit()
    g.close()


def test_points_of_an_uncommitted_failover(tmp_path: Path) -> None:
    g, model, ids, _before = failed_over_group(tmp_path)
    with pytest.raises(Conflict, match="is live at .* since checkpoint %s" % ids[3]):
        g.restore("a", str(tmp_path / "newest"))
    with pytest.raises(Conflict, match="checkpoint %s .* is after that point" % ids[5]):
        g.restore("a", str(tmp_path / "later"), ids[5])
    g.restore("b", str(tmp_path / "ok"), ids[1])
    assert (tmp_path / "ok").read_bytes() == model.at[ids[1]][1]
    with pytest.raises(Conflict, match=r"already failed over here: it is live at .*"
                                       r"failed over, uncommitted.*--rollback"):
        g.failover_live(None, None)
    g.close()


def test_a_failover_of_an_earlier_ferry_commits_but_does_not_roll_back(
        tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model)
    ids = fill(g, model, 4, seed=32)
    g.close()
    m = json.loads((tmp_path / "g" / "meta.json").read_text())
    cut = next(c for c in open_group(tmp_path / "g").checkpoints if c.id == ids[2]).cut
    m["failover"] = {"state": "applying", "checkpoint": None, "cut": [list(p) for p in cut],
                     "wall_ns": 1}  # no live paths: the replicas are the live disks
    (tmp_path / "g" / "meta.json").write_text(json.dumps(m))
    g = open_group(tmp_path / "g")
    assert failover.live_path(g, "a") == g.replica_path("a")
    assert replica(g, "a") == model.at[ids[2]][0]
    with pytest.raises(Conflict, match="earlier Ferry"):
        g.failover_rollback()
    assert g.failover_commit()["state"] == "committed"
    assert replica(g, "a") == model.at[ids[2]][0]
    g.close()


# -- with real agents ----------------------------------------------------------------------

def setup_failover(lab: Lab) -> tuple:
    disks = {"vda": lab.image("vda.img", 8 * MiB)}
    uris = lab.protect("g1", *disks.values())
    wait_replicating(lab, "g1")
    saved = checkpoint_series(lab, "g1", disks, uris, 2, seed=41)
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    out = json.loads(lab.b.ferry("failover", "g1", "--live", "--checkpoint", saved[0][0],
                                 "--json").stdout)
    h = connect(out["disks"]["vda"])
    h.pwrite(b"L" * 65536, 0)  # B's live write
    h.flush()
    h.shutdown()
    return disks, uris, saved, out


def refused(lab: Lab, *args: str) -> str:
    proc = lab.b.ferry(*args, check=False)
    assert proc.returncode == EXIT_CONFLICT, (args, proc.returncode, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_points_commit_and_its_refusals(sites: Lab) -> None:
    _disks, _uris, saved, out = setup_failover(sites)
    uri = out["disks"]["vda"]
    cid = saved[0][0]
    st = sites.b.status("g1")["replicas"]["g1"]["failover"]
    assert st["state"] == "done" and st["label"] == "failed over, uncommitted"
    assert st["exports"] == {"vda": uri}
    assert "FAILED OVER LIVE (failed over, uncommitted)" in sites.b.ferry("status").stdout

    # Points: the newest is the live disk, later ones are off the timeline; earlier ones
    # read true (not the live disk).
    for args in (("restore", "g1", "--disk", "vda", "--to", str(sites.work / "x")),
                 ("view", "g1"), ("failover", "g1", "--test")):
        line = refused(sites, *args)
        assert "is live at %s since checkpoint %s" % (uri, cid) in line, line
    line = refused(sites, "restore", "g1", "--disk", "vda", "--to", str(sites.work / "x"),
                   "--checkpoint", saved[1][0])
    assert "is after that point" in line and saved[1][0] in line
    assert same_bytes(restore_to(sites, "g1", "vda", "--checkpoint", cid), saved[0][2]["vda"])
    view = json.loads(sites.b.ferry("view", "g1", "--checkpoint", cid, "--json").stdout)
    assert read_all(view["disks"]["vda"], 8 * MiB) == saved[0][2]["vda"].read_bytes()
    assert "--rollback" in refused(sites, "failover", "g1", "--live")
    assert "failed over, uncommitted" in refused(sites, "failover", "g1", "--live")
    assert "close them" in refused(sites, "failover", "g1", "--commit")
    sites.b.ferry("view-close", view["id"])
    test = json.loads(sites.b.ferry("failover", "g1", "--test", "--checkpoint", cid,
                                    "--json").stdout)
    assert read_all(test["disks"]["vda"], 8 * MiB) == saved[0][2]["vda"].read_bytes()
    sites.b.ferry("failover", "g1", "--stop-test")

    # A bad request: a point with --commit.
    proc = sites.b.ferry("failover", "g1", "--commit", "--checkpoint", cid, check=False)
    assert proc.returncode == EXIT_USAGE and "takes no point" in proc.stderr
    with pytest.raises(Invalid, match="takes no point"):
        sites.b.api("POST", "/v1/replicas/g1/failover", {"mode": "commit", "checkpoint": cid})

    # Resumed across a kill -9: still uncommitted, still served.
    sites.b.kill()
    sites.b.start()
    assert sites.b.status("g1")["replicas"]["g1"]["failover"]["state"] == "done"
    text = sites.b.ferry("failover", "g1", "--commit").stdout
    assert text.startswith("failover of g1 committed at checkpoint %s" % cid), text
    assert uri in text
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["failover"]["state"] == "committed" and st["checkpoints"] == 0
    assert st["failover"]["label"] == "failed over, committed"
    assert "FAILED OVER LIVE (failed over, committed)" in sites.b.ferry("status").stdout
    # The failover point is the base: the replica holds it, the live disk its writes.
    assert same_bytes(Path(st["disks"]["vda"]["replica"]), saved[0][2]["vda"])
    assert read_all(uri, 65536) == b"L" * 65536
    line = refused(sites, "restore", "g1", "--disk", "vda", "--to", str(sites.work / "y"),
                   "--checkpoint", cid)
    assert "discarded by the commit" in line and uri in line
    assert "discarded by the commit" in refused(sites, "view", "g1", "--checkpoint", cid)
    assert "cannot be rolled back" in refused(sites, "failover", "g1", "--rollback")
    assert "nothing to commit" in refused(sites, "failover", "g1", "--commit")
    assert "nothing more to fail over" in refused(sites, "failover", "g1", "--live")
    sites.b.stop()
    sites.b.start()
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["failover"]["state"] == "committed" and st["views"][0]["state"] == "serving"
    assert read_all(uri, 65536) == b"L" * 65536


def test_rollback_replicates_again_byte_exact(sites: Lab) -> None:
    disks, uris, saved, out = setup_failover(sites)
    uri = out["disks"]["vda"]
    pid = pid_of(sites, "live-g1", "vda")
    # Site A writes on meanwhile (its link refused): those writes come after the rollback.
    h = connect(uris["vda"])
    scribble(h, 8 * MiB, random.Random(42))
    h.shutdown()
    sites.b.kill()  # resumed across a restart, uncommitted
    sites.b.start()
    assert sites.b.status("g1")["replicas"]["g1"]["failover"]["state"] == "done"
    result = json.loads(sites.b.ferry("failover", "g1", "--rollback", "--json").stdout)
    assert result["failover"]["state"] == "none" and result["group"] == "g1"
    assert not answers(uri) and not exports.is_ours(pid, uri.split("socket=")[1])
    st = sites.b.status("g1")["replicas"]["g1"]
    assert st["failover"] is None and st["views"] == []
    assert not (sites.b.data / "target" / "g1" / "live").exists()
    assert "not failed over" in refused(sites, "failover", "g1", "--rollback")
    assert "not failed over" in refused(sites, "failover", "g1", "--commit")

    # Every old point as it was (the live write nowhere), then replicating again: the
    # source's newest state, byte for byte (its writes during the failover with it).
    for cid, _tag, copies in saved:
        got = restore_to(sites, "g1", "vda", "--checkpoint", cid)
        assert same_bytes(got, copies["vda"]), first_difference(got, copies["vda"])
    wait_replicating(sites, "g1")  # the source is back (it retries every few seconds)
    checkpoint_series(sites, "g1", disks, uris, 1, seed=43)  # (its copies replace round-0's)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    newest = restore_to(sites, "g1", "vda")
    assert same_bytes(newest, disks["vda"]), first_difference(newest, disks["vda"])
    # And it can fail over again.
    again = json.loads(sites.b.ferry("failover", "g1", "--live", "--json").stdout)
    assert read_all(again["disks"]["vda"], 8 * MiB) == disks["vda"].read_bytes()
