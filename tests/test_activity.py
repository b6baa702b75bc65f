"""The activity log: what may be owed after a crash, in a file, within a fixed size."""

from __future__ import annotations

import json
from pathlib import Path

from formats import localwire as lw
from nbd_plugin import activity, state
from nbd_plugin.activity import ActivityLog
from nbd_plugin.changelog import ChangeLog
from nbd_plugin.dirtymap import DirtyMap

MiB = 1024 * 1024
EXT = 4 * MiB


def hot(_extent: int) -> bool:
    return False


def cold(_extent: int) -> bool:
    return True


def test_extents_enter_durably_and_read_back(tmp_path: Path) -> None:
    al = ActivityLog(str(tmp_path / "al"), slots=8)
    assert not al.covers(0, 4096)
    al.ensure(0, 4096, hot)
    al.ensure(EXT - 1, 2, hot)  # spans extents 0 and 1
    al.ensure(10 * EXT, EXT, hot)
    assert al.covers(EXT, 10) and al.covers(10 * EXT, EXT)
    assert al.syncs == 3
    al.ensure(0, 4096, hot)  # already in: no I/O
    assert al.syncs == 3
    rec = activity.read(str(tmp_path / "al"))
    assert rec == activity.Recorded([0, 1, 10], False, EXT)


def test_only_cold_extents_are_evicted_and_a_full_log_overflows(tmp_path: Path) -> None:
    al = ActivityLog(str(tmp_path / "al"), slots=2)
    al.ensure(0, 1, hot)
    al.ensure(EXT, 1, hot)
    al.ensure(2 * EXT, 1, lambda e: e == 0)  # extent 0 is cold: its slot goes to 2
    assert activity.read(str(tmp_path / "al")) == activity.Recorded([1, 2], False, EXT)
    al.ensure(3 * EXT, 1, hot)  # nothing cold: the log overflows, durably
    rec = activity.read(str(tmp_path / "al"))
    assert rec is not None and rec.overflow and rec.extents == [1, 2]


def test_a_new_log_replaces_the_old_one(tmp_path: Path) -> None:
    path = str(tmp_path / "al")
    ActivityLog(path, slots=4).ensure(0, 1, hot)
    ActivityLog(path, slots=4)
    assert activity.read(path) == activity.Recorded([], False, EXT)


def test_unusable_logs_read_as_none(tmp_path: Path) -> None:
    path = tmp_path / "al"
    assert activity.read(str(path)) is None
    path.write_bytes(b"short")
    assert activity.read(str(path)) is None
    path.write_bytes(b"XXXX" + bytes(60))
    assert activity.read(str(path)) is None


def test_changelog_keeps_owed_extents_hot_until_acked(tmp_path: Path) -> None:
    al = ActivityLog(str(tmp_path / "al"), slots=2)
    cl = ChangeLog(1, 1 << 30, DirtyMap(), activity=al)
    cl.commit(cl.begin(0, 4096), lw.KIND_WRITE, 0, 4096, bytes(4096))
    cl.commit(cl.begin(EXT, 4096), lw.KIND_WRITE, EXT, 4096, bytes(4096))
    # Both extents hold unacked records: a third extent cannot take a slot.
    cl.commit(cl.begin(2 * EXT, 4096), lw.KIND_WRITE, 2 * EXT, 4096, bytes(4096))
    assert al.overflow
    cl2 = ChangeLog(1, 1 << 30, DirtyMap(), activity=ActivityLog(str(tmp_path / "b"), slots=2))
    assert cl2.activity is not None
    cl2.commit(cl2.begin(0, 4096), lw.KIND_WRITE, 0, 4096, bytes(4096))
    cl2.commit(cl2.begin(EXT, 4096), lw.KIND_WRITE, EXT, 4096, bytes(4096))
    cl2.take(1 << 20, 0)
    cl2.ack(1, 1)  # extent 0 is acked: cold
    cl2.commit(cl2.begin(2 * EXT, 4096), lw.KIND_WRITE, 2 * EXT, 4096, bytes(4096))
    assert not cl2.activity.overflow
    assert activity.read(str(tmp_path / "b")) == activity.Recorded([1, 2], False, EXT)


def test_dirty_ranges_keep_their_extents_hot(tmp_path: Path) -> None:
    al = ActivityLog(str(tmp_path / "al"), slots=1)
    cl = ChangeLog(1, 10, DirtyMap(), activity=al)  # every write overflows to dirty
    cl.commit(cl.begin(0, 4096), lw.KIND_WRITE, 0, 4096, bytes(4096))
    assert cl.dirty.bytes == 4096
    cl.commit(cl.begin(EXT, 4096), lw.KIND_WRITE, EXT, 4096, bytes(4096))
    assert al.overflow  # extent 0 is dirty, so it could not leave


def test_state_after_a_crash_owes_the_active_extents(tmp_path: Path) -> None:
    st, al_path = str(tmp_path / "state.json"), str(tmp_path / "state.json.al")
    size = 64 * MiB
    first = state.load(st, size, al_path)
    assert first.dirty is None and first.initial  # new protection: everything
    state.carry_done(st, first.gen, size)  # the initial sync read everything back
    al = ActivityLog(al_path, slots=8)
    al.ensure(5 * EXT + 10, 100, hot)
    al.ensure(size - 1, 1, hot)  # the last extent, clipped to the disk
    # kill -9: no clean save.
    second = state.load(st, size, al_path)
    assert second.gen > first.gen
    assert sorted(second.dirty or []) == [(5 * EXT, EXT), (size - EXT, EXT)]
    assert "active extents" in second.reason
    # What this run owes is carried in its state file until read back.
    carried = json.loads(Path(st).read_text())["dirty"]
    assert sorted(map(tuple, carried)) == [(5 * EXT, EXT), (size - EXT, EXT)]
    ActivityLog(al_path, slots=8)  # this run's log, empty; it crashes at once
    third = state.load(st, size, al_path)
    assert sorted(third.dirty or []) == [(5 * EXT, EXT), (size - EXT, EXT)]


def test_state_after_a_crash_with_an_overflowed_or_missing_log_owes_everything(
        tmp_path: Path) -> None:
    st, al_path = str(tmp_path / "state.json"), str(tmp_path / "state.json.al")
    size = 16 * MiB
    gen = state.load(st, size, al_path).gen
    state.carry_done(st, gen, size)
    al = ActivityLog(al_path, slots=1)
    al.ensure(0, 1, hot)
    al.ensure(EXT, 1, hot)
    assert state.load(st, size, al_path).dirty is None
    state.carry_done(st, gen + 1, size)
    Path(al_path).unlink()
    loaded = state.load(st, size, al_path)
    assert loaded.dirty is None and "no activity log" in loaded.reason


def test_idle_cold_extents_leave_the_log(tmp_path: Path) -> None:
    path = str(tmp_path / "al")
    cl = ChangeLog(1, 1 << 30, DirtyMap(), activity=ActivityLog(path, slots=8))
    assert cl.activity is not None
    cl.activity.now = 100.0
    cl.commit(cl.begin(0, 4096), lw.KIND_WRITE, 0, 4096, bytes(4096))
    cl.commit(cl.begin(EXT, 4096), lw.KIND_WRITE, EXT, 4096, bytes(4096))
    cl.take(1 << 20, 0)
    cl.ack(1, 1)  # extent 0 acked, extent 1 not
    assert cl.trim_activity(102.0, idle=5) == 0  # not idle long enough
    assert cl.trim_activity(106.0, idle=5) == 1  # extent 0 leaves; 1 is still owed
    assert activity.read(path) == activity.Recorded([1], False, EXT)
    cl.ack(1, 2)
    assert cl.trim_activity(107.0, idle=5) == 1
    assert activity.read(path) == activity.Recorded([], False, EXT)
    # Written again: back in the log, durably, before the write.
    cl.commit(cl.begin(0, 4096), lw.KIND_WRITE, 0, 4096, bytes(4096))
    assert activity.read(path) == activity.Recorded([0], False, EXT)


def test_many_extents_acked_and_forgotten_stay_cold(tmp_path: Path) -> None:
    """The change log remembers, per extent, its newest queued record; a trim forgets the
    acked ones, and an extent is owed exactly while a record in it is unacked."""
    path = str(tmp_path / "al")
    cl = ChangeLog(1, 1 << 40, DirtyMap(), activity=ActivityLog(path, slots=4096))
    assert cl.activity is not None
    cl.activity.now = 100.0
    for e in range(3000):
        cl.commit(cl.begin(e * EXT, 4096), lw.KIND_WRITE, e * EXT, 4096, bytes(4096))
    # One write over two extents, one zero-length write (no extent).
    cl.commit(cl.begin(3 * EXT - 10, 20), lw.KIND_WRITE, 3 * EXT - 10, 20, bytes(20))
    cl.commit(cl.begin(7 * EXT, 0), lw.KIND_WRITE, 7 * EXT, 0, b"")
    cl.take(1 << 40, 0)
    cl.ack(1, 2000)  # extents 0..1999 acked, then 2, 3 again (seq 3001) and 2000..2999 not
    assert cl.trim_activity(106.0, idle=5) == 1998
    left = activity.read(path)
    assert left is not None and sorted(left.extents) == [2, 3, *range(2000, 3000)]
    cl.ack(1, 3002)
    assert cl.trim_activity(107.0, idle=5) == 1002
    assert activity.read(path) == activity.Recorded([], False, EXT)


def test_a_write_during_a_trim_is_logged_again(tmp_path: Path) -> None:
    """Detached extents are out of the log's map before their slots are cleared: a write
    arriving between the two takes a fresh slot, so the file never misses it."""
    path = str(tmp_path / "al")
    al = ActivityLog(path, slots=2)
    al.now = 10.0
    al.ensure(0, 1, hot)
    al.now = 20.0
    slots = al.detach_idle(cold, idle=5)
    assert slots == [0]  # the first free slot, taken by extent 0
    al.ensure(0, 1, hot)  # the write in between: a free slot, not the detached one
    al.clear_slots(slots)
    al.release_slots(slots)
    assert activity.read(path) == activity.Recorded([0], False, EXT)
