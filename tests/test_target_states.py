"""agent/target/: the state tables (a disk under the hold-back rule, a group, a failover) and
meta.json read back, as plain logic."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.errors import IllegalTransition, StorageError
from agent.target import failover, meta
from agent.target.group import LIFE, GroupEvent, GroupState
from agent.target.holdback import DISK, Event, HoldBack, Phase
from formats.records import FLAG_INCONSISTENT, KIND_CONSISTENT, KIND_WRITE


def test_a_disk_never_whole_is_never_held() -> None:
    rule = HoldBack([False], [0])
    assert rule.admit(0, KIND_WRITE, FLAG_INCONSISTENT)
    rule.journaled(0, KIND_CONSISTENT)
    assert rule.admit(0, KIND_CONSISTENT, 0) and rule.whole(0)


def test_a_resync_is_held_until_its_consistent_marker_is_journaled() -> None:
    rule = HoldBack([True, True], [0, 0])
    assert rule.admit(0, KIND_WRITE, 0)
    assert not rule.admit(0, KIND_WRITE, FLAG_INCONSISTENT) and rule.held(0)
    assert not rule.admit(0, KIND_WRITE, FLAG_INCONSISTENT)  # asked again: still held
    assert rule.admit(1, KIND_WRITE, 0) and not rule.held(1)  # the other disk goes on
    copy = rule.copy()
    rule.journaled(0, KIND_CONSISTENT)
    assert rule.admit(0, KIND_WRITE, FLAG_INCONSISTENT)  # the resync's end is journaled
    assert rule.admit(0, KIND_CONSISTENT, 0) and rule.phases[0] is Phase.WHOLE
    assert copy.held(0) and copy.pending == [0, 0]  # a copy is a reader of its own


def test_illegal_steps_raise() -> None:
    with pytest.raises(IllegalTransition, match="held at a record while initial-sync"):
        DISK.step(Phase.INITIAL_SYNC, Event.HOLD)
    with pytest.raises(IllegalTransition):
        failover.FAILOVER.step(failover.State.DONE, failover.Event.APPLIED)
    with pytest.raises(IllegalTransition):
        failover.FAILOVER.step(failover.State.NONE, failover.Event.APPLIED)
    with pytest.raises(IllegalTransition):
        LIFE.step(GroupState.CLOSED, GroupEvent.FAILOVER)
    assert LIFE.step(GroupState.RECEIVING, GroupEvent.FAILOVER) is GroupState.FAILED_OVER
    assert failover.state_of(None) is failover.State.NONE
    assert failover.state_of({"state": "applying"}) is failover.State.APPLYING


def test_meta_json_read_back_or_refused_by_name(tmp_path: Path) -> None:
    assert meta.load(str(tmp_path)) is None
    good = {"group": "g", "disks": [{"name": "a", "size": 64, "applied_gen": 1,
                                     "applied_seq": 2, "ever_consistent": True}],
            "applied": [1, 0], "tags": {}, "failover": None}
    meta.save(str(tmp_path), good)
    assert meta.load(str(tmp_path)) == good and meta.disks(good) == [("a", 64)]
    path = tmp_path / "meta.json"
    for bad, words in (("{ not json", "JSONDecodeError"),
                       ("[]", "not a JSON map"),
                       (json.dumps({"disks": [{"name": "a"}]}), "without a name and a size"),
                       (json.dumps({"disks": [{"name": "a", "size": 1}]}), "no applied_gen"),
                       (json.dumps({"applied": [1]}), "not a journal position"),
                       (json.dumps({"failover": {"state": "odd", "cut": []}}), "failover")):
        path.write_text(bad)
        with pytest.raises(StorageError, match=words) as e:
            meta.load(str(tmp_path))
        assert str(path) in str(e.value) and e.value.path == str(path)


def test_a_closed_group_takes_nothing_and_closes_once(tmp_path: Path) -> None:
    from agent.protocol.frames import ProtocolError
    from agent.target.group import TargetGroup
    from formats.records import JRecord

    g = TargetGroup(str(tmp_path), "g", [("a", 64)], protection="p1")
    assert g.state is GroupState.RECEIVING
    g.close()
    g.close()  # a second close changes nothing
    assert g.state is GroupState.CLOSED
    with pytest.raises(ProtocolError, match="is closed"):
        g.accept([JRecord(0, 1, 1, KIND_WRITE, 0, 0, 1, 0, b"x")])
