"""agent/target/group.py: a protection group on the target site, on real files.

Records are checked before anything is written, applied in journal order, held back while a
disk that was once whole is resyncing, re-applied after a crash, and restored as sparse
copies."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.checkpoints import CheckpointError
from agent.protocol.frames import MAX_RECORD, ProtocolError
from agent.target import applier
from agent.target.group import NoConsistentState, SizeMismatch, TargetGroup
from agent.target.journal import KIND_APPLIED, JRecord
from formats.localwire import (
    FLAG_INCONSISTENT,
    FLAG_RESYNC,
    KIND_CONSISTENT,
    KIND_FLUSH,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
)

INC = FLAG_INCONSISTENT
RESYNC = FLAG_INCONSISTENT | FLAG_RESYNC


def w(seq: int, offset: int, data: bytes, disk: int = 0, gen: int = 1,
      flags: int = 0) -> JRecord:
    return JRecord(disk, gen, seq, KIND_WRITE, flags, offset, len(data), seq * 10, data)


def z(seq: int, offset: int, length: int, disk: int = 0, gen: int = 1, flags: int = 0,
      kind: int = KIND_ZERO) -> JRecord:
    return JRecord(disk, gen, seq, kind, flags, offset, length, seq * 10, None)


def consistent(seq: int, disk: int = 0, gen: int = 1) -> JRecord:
    return JRecord(disk, gen, seq, KIND_CONSISTENT, 0, 0, 0, seq * 10, None)


def flush(seq: int, disk: int = 0, gen: int = 1) -> JRecord:
    return JRecord(disk, gen, seq, KIND_FLUSH, 0, 0, 0, seq * 10, None)


def open_group(path: Path, disks: Optional[List[Tuple[str, int]]] = None,
               protection: Optional[str] = "p1") -> TargetGroup:
    # No history and no room in the journal: every record is promoted to the replica at
    # once, so these tests see the applier's rules directly (history has its own tests).
    g = TargetGroup(str(path), "g", disks if disks is not None else [("a", 64)],
                    protection=protection, history_s=0, journal_max=0)
    g.maintain()  # after a crash, re-apply from meta.json's position (a promotion does)
    return g


def accept(g: TargetGroup, records: list) -> int:
    """How many of ``records`` were new."""
    return g.accept(records)[0]


def replica(g: TargetGroup, disk: str = "a") -> bytes:
    return Path(g.replica_path(disk)).read_bytes()


def journal_files(path: Path) -> Dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((path / "journal").iterdir())}


def crash(g: TargetGroup) -> None:
    """The process dies: no checkpoint, no meta update; only its descriptors go away."""
    for fd in g.fds:
        os.close(fd)
    g.journal.close()


def image(size: int, *writes: Tuple[int, bytes]) -> bytes:
    buf = bytearray(size)
    for offset, data in writes:
        buf[offset:offset + len(data)] = data
    return bytes(buf)


def made_consistent(path: Path) -> TargetGroup:
    """A one-disk group whose initial sync ended: A*16 at 0, then B*16 at 16."""
    g = open_group(path)
    accept(g, [w(1, 0, b"A" * 16, flags=RESYNC), consistent(2), w(3, 16, b"B" * 16)])
    assert replica(g) == image(64, (0, b"A" * 16), (16, b"B" * 16))
    return g


# -- applying ----------------------------------------------------------------------------------

def test_new_group_has_zeroed_replicas_of_the_right_size(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 64), ("b", 4096)])
    assert replica(g, "a") == bytes(64)
    assert replica(g, "b") == bytes(4096)
    assert g.durable() == [(0, 0), (0, 0)]
    g.close()


def test_accept_applies_writes_zeroes_and_trims(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 8192)])
    assert accept(g, [w(1, 0, b"x" * 8192)]) == 1
    assert replica(g) == b"x" * 8192
    assert accept(g, [z(2, 100, 50), z(3, 4096, 4096, kind=KIND_TRIM), flush(4),
                     w(5, 4100, b"late")]) == 4
    assert replica(g) == image(8192, (0, b"x" * 100), (150, b"x" * 3946), (4100, b"late"))
    assert g.durable() == [(1, 5)]
    g.close()


def test_records_of_several_disks_go_to_their_own_replica(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 64), ("b", 64)])
    accept(g, [w(1, 0, b"a0", disk=0), w(1, 8, b"b1", disk=1), w(2, 2, b"a1", disk=0),
              w(2, 10, b"b2", disk=1, )])
    assert replica(g, "a") == image(64, (0, b"a0a1"))
    assert replica(g, "b") == image(64, (8, b"b1b2"))
    assert g.durable() == [(1, 2), (1, 2)]
    g.close()


def test_duplicates_are_skipped(tmp_path: Path) -> None:
    g = open_group(tmp_path)
    assert accept(g, [w(1, 0, b"one"), w(2, 0, b"two")]) == 2
    before = journal_files(tmp_path)
    # Resent after a reconnect, with different bytes: a duplicate is never applied again.
    assert accept(g, [w(1, 0, b"XXX"), w(2, 0, b"YYY")]) == 0
    assert replica(g) == image(64, (0, b"two"))
    assert journal_files(tmp_path) == before
    # A batch that overlaps what is held: only the new records count.
    assert accept(g, [w(2, 0, b"ZZZ"), w(3, 8, b"three")]) == 1
    assert replica(g) == image(64, (0, b"two"), (8, b"three"))
    g.close()


def test_lower_generations_are_duplicates_and_a_new_one_starts_at_one(tmp_path: Path) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"g2s1", gen=2), w(2, 0, b"g2s2", gen=2)])
    assert accept(g, [w(7, 0, b"old!", gen=1)]) == 0
    assert accept(g, [w(1, 0, b"g3s1", gen=3), w(2, 4, b"g3s2", gen=3)]) == 2
    assert g.durable() == [(3, 2)]
    assert replica(g) == image(64, (0, b"g3s1g3s2"))
    g.close()


@pytest.mark.parametrize("bad", [
    w(4, 0, b"gap"),                # skips 3
    w(2, 0, b"new gen", gen=2),     # a new generation must start at 1
    w(5, 0, b"far", gen=1),
])
def test_a_gap_raises_and_changes_nothing(tmp_path: Path, bad: JRecord) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"first")])
    before_journal, before_replica = journal_files(tmp_path), replica(g)
    with pytest.raises(ProtocolError, match="gap"):
        accept(g, [w(2, 10, b"fine"), bad])
    assert journal_files(tmp_path) == before_journal
    assert replica(g) == before_replica
    assert g.durable() == [(1, 1)]
    # The cursor did not move: the right record is still next.
    assert accept(g, [w(2, 10, b"fine")]) == 1
    assert replica(g) == image(64, (0, b"first"), (10, b"fine"))
    g.close()


@pytest.mark.parametrize("bad", [
    w(2, 60, b"12345"),                       # past the end
    w(2, 64, b"x"),                           # starts at the end
    z(2, 0, 65),
    z(2, 1 << 40, 1, kind=KIND_TRIM),
    w(2, 0, b"x", disk=1),                    # no such disk
    w(2, 0, b"x", disk=-1),
    JRecord(0, 1, 2, KIND_WRITE, 0, 0, 4, 0, None),      # a write without data
    JRecord(0, 1, 2, KIND_WRITE, 0, 0, 4, 0, b"toolong"),  # data of the wrong length
])
def test_bad_records_raise_before_any_write(tmp_path: Path, bad: JRecord) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"first")])
    before_journal, before_replica = journal_files(tmp_path), replica(g)
    with pytest.raises(ProtocolError):
        accept(g, [w(2, 10, b"fine"), w(3, 20, b"fine too"), bad])
    assert journal_files(tmp_path) == before_journal
    assert replica(g) == before_replica
    assert g.durable() == [(1, 1)]
    g.close()


def test_a_duplicate_out_of_bounds_is_still_refused(tmp_path: Path) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"first")])
    with pytest.raises(ProtocolError):
        accept(g, [w(1, 63, b"xx")])


def test_records_up_to_the_last_byte_are_accepted(tmp_path: Path) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 60, b"end!"), z(2, 63, 1), w(3, 64, b""), consistent(4)])
    assert replica(g)[60:] == b"end\0"
    g.close()


@pytest.mark.parametrize("kind", [KIND_ZERO, KIND_TRIM])
def test_zero_length_zero_or_trim_is_harmless(tmp_path: Path, kind: int) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"before")])
    try:
        accept(g, [z(2, 10, 0, kind=kind), w(3, 6, b"after")])
    finally:
        assert g.durable() == [(1, 3)]  # journaled either way
    assert replica(g)[:11] == b"beforeafter"
    g.close()


def test_write_larger_than_max_record_is_refused(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 2 * MAX_RECORD)])
    with pytest.raises(ProtocolError):
        accept(g, [w(1, 0, bytes(MAX_RECORD + 1))])
    assert g.durable() == [(0, 0)]
    g.close()


# -- holding back while a disk resyncs ---------------------------------------------------------

def test_a_disk_never_consistent_is_applied_as_it_comes(tmp_path: Path) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"sync", flags=RESYNC), w(2, 8, b"guest", flags=INC)])
    assert replica(g) == image(64, (0, b"sync"), (8, b"guest"))
    st = g.status()["disks"]["a"]
    assert st["ever_consistent"] is False and st["consistent"] is False
    g.close()


def test_inconsistent_records_wait_for_the_consistent_marker(tmp_path: Path) -> None:
    g = made_consistent(tmp_path)
    whole = image(64, (0, b"A" * 16), (16, b"B" * 16))
    assert g.status()["disks"]["a"]["consistent"] is True
    # Overflow on the source: the stream is inconsistent until its resync ends.
    assert accept(g, [w(4, 0, b"C" * 16, flags=INC)]) == 1
    assert g.durable() == [(1, 4)]  # durable (the source may free it) ...
    assert replica(g) == whole     # ... but not applied
    st = g.status()["disks"]["a"]
    assert st["consistent"] is False and st["applied_seq"] == 3 and st["durable_seq"] == 4
    accept(g, [w(5, 32, b"D" * 16, flags=RESYNC), flush(6)])
    assert replica(g) == whole
    accept(g, [consistent(7)])
    assert replica(g) == image(64, (0, b"C" * 16), (16, b"B" * 16), (32, b"D" * 16))
    st = g.status()["disks"]["a"]
    assert st["consistent"] is True and st["applied_seq"] == 7
    # Whole again: plain records apply at once.
    accept(g, [w(8, 48, b"E")])
    assert replica(g)[48:49] == b"E"
    g.close()


def test_each_resync_needs_its_own_marker(tmp_path: Path) -> None:
    g = made_consistent(tmp_path)
    accept(g, [w(4, 0, b"1", flags=INC), consistent(5), w(6, 1, b"2", flags=INC)])
    assert replica(g)[:3] == b"1AA"  # the first resync ended; the second did not
    accept(g, [consistent(7)])
    assert replica(g)[:3] == b"12A"
    g.close()


def test_a_held_disk_holds_the_records_after_it_on_other_disks(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 64), ("b", 64)])
    accept(g, [consistent(1, disk=0), consistent(1, disk=1)])
    accept(g, [w(2, 0, b"b-before", disk=1), w(2, 0, b"a-held", disk=0, flags=INC),
              w(3, 8, b"b-after", disk=1)])
    # Journal order is the group's timeline: nothing after the held record is applied.
    assert replica(g, "a") == bytes(64)
    assert replica(g, "b") == image(64, (0, b"b-before"))
    accept(g, [consistent(3, disk=0)])
    assert replica(g, "a") == image(64, (0, b"a-held"))
    assert replica(g, "b") == image(64, (0, b"b-before"), (8, b"b-after"))
    g.close()


# -- restore -------------------------------------------------------------------------------------

def test_restore_refuses_a_disk_that_was_never_consistent(tmp_path: Path) -> None:
    g = open_group(tmp_path / "g")
    accept(g, [w(1, 0, b"half a sync", flags=RESYNC)])
    dest = tmp_path / "out.img"
    with pytest.raises(NoConsistentState):
        g.restore("a", str(dest))
    assert not dest.exists()
    with pytest.raises(CheckpointError, match="no disk nope"):
        g.restore("nope", str(dest))
    g.close()


def test_restore_writes_an_identical_sparse_copy(tmp_path: Path) -> None:
    size = 8 << 20
    g = open_group(tmp_path / "g", [("a", size)])
    accept(g, [w(1, 4 << 20, b"\xab" * 4096, flags=RESYNC), w(2, size - 3, b"end", flags=RESYNC),
              w(3, 0, b"\1" * 65536, flags=RESYNC), z(4, 0, 65536, kind=KIND_TRIM),
              consistent(5)])
    dest = tmp_path / "out.img"
    info = g.restore("a", str(dest))
    assert info["size"] == size and info["seq"] == 5 and info["resyncing"] is False
    assert dest.read_bytes() == replica(g)
    assert dest.read_bytes() == image(size, (4 << 20, b"\xab" * 4096), (size - 3, b"end"))
    assert dest.stat().st_size == size
    assert dest.stat().st_blocks * 512 < 1 << 20  # holes stayed holes
    assert not (tmp_path / "out.img.ferry-partial").exists()
    g.close()


def test_restore_while_resyncing_gives_the_last_consistent_state(tmp_path: Path) -> None:
    g = made_consistent(tmp_path / "g")
    accept(g, [w(4, 0, b"C" * 16, flags=INC)])
    dest = tmp_path / "out.img"
    info = g.restore("a", str(dest))
    assert info["resyncing"] is True and info["seq"] == 3
    assert dest.read_bytes() == image(64, (0, b"A" * 16), (16, b"B" * 16))
    g.close()


# -- reopening -----------------------------------------------------------------------------------

def test_reopen_after_close_keeps_replica_and_cursors(tmp_path: Path) -> None:
    g = made_consistent(tmp_path)
    accept(g, [w(4, 0, b"C" * 16, flags=INC)])  # held
    held = replica(g)
    g.close()
    g = open_group(tmp_path)
    assert g.durable() == [(1, 4)]
    assert replica(g) == held
    assert g.status()["disks"]["a"]["consistent"] is False
    assert accept(g, [w(4, 0, b"dup")]) == 0
    accept(g, [consistent(5)])
    assert replica(g)[:16] == b"C" * 16
    g.close()


def test_reopen_after_a_crash_reapplies_from_meta(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 4096)])
    accept(g, [w(1, 0, b"one" * 100, flags=RESYNC), consistent(2)])
    g.checkpoint()
    at_checkpoint = replica(g)
    accept(g, [w(3, 1000, b"two" * 100), z(4, 0, 10)])
    expected = replica(g)
    assert expected != at_checkpoint
    crash(g)
    # Every promotion ends with a checkpoint: the replica as it stood is durable.
    g = open_group(tmp_path, [("a", 4096)])
    assert replica(g) == expected
    assert g.durable() == [(1, 4)]
    assert accept(g, [w(4, 0, b"dup")]) == 0
    assert accept(g, [w(5, 0, b"five")]) == 1
    g.close()


def test_reopen_after_a_crash_without_any_checkpoint(tmp_path: Path) -> None:
    # Disk a is whole, disk b's initial sync runs: the group has no history yet, so a's
    # changes are applied as they come, with no checkpoint after them.
    disks = [("a", 64), ("b", 64)]
    g = open_group(tmp_path, disks)
    accept(g, [w(1, 0, b"x" * 64, flags=RESYNC), consistent(2)])
    g.checkpoint()
    accept(g, [w(3, 0, b"a" * 10), w(4, 5, b"b" * 10), z(5, 8, 4)])
    expected = replica(g)
    crash(g)
    Path(g.replica_path("a")).write_bytes(b"x" * 64)  # every replica write since was lost
    g = open_group(tmp_path, disks)
    assert replica(g) == expected == image(64, (0, b"aaaaabbb"), (12, b"bbb" + b"x" * 49))
    assert g.durable() == [(1, 5), (0, 0)]
    g.close()


# -- the initial sync writes straight to the replica -------------------------------------------

def journal_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in (path / "journal").glob("*.fjr"))


def test_an_initial_sync_is_written_once_and_journaled_without_data(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 1 << 20)])
    before = journal_bytes(tmp_path)
    accept(g, [w(1, 0, b"d" * 65536, flags=RESYNC), z(2, 4096, 4096, flags=RESYNC),
               w(3, 8192, b"e" * 100, flags=RESYNC)])
    assert journal_bytes(tmp_path) - before == 3 * 48  # headers only
    want = bytearray(b"d" * 65536 + bytes((1 << 20) - 65536))
    want[4096:8192] = bytes(4096)
    want[8192:8292] = b"e" * 100
    assert replica(g) == bytes(want)
    assert g.durable() == [(1, 3)]
    kinds = [r.kind for r, _ in g.journal.read_from(g.journal.start)]
    assert kinds == [KIND_APPLIED] * 3
    # From the disk's consistent marker on, changes keep their data in the journal.
    accept(g, [consistent(4), w(5, 0, b"f" * 1000)])
    assert journal_bytes(tmp_path) - before >= 5 * 48 + 1000
    want[:1000] = b"f" * 1000
    assert replica(g) == bytes(want)
    crash(g)
    g = open_group(tmp_path, [("a", 1 << 20)])
    assert replica(g) == bytes(want) and g.durable() == [(1, 5)]
    g.restore("a", str(tmp_path / "out.img"))
    assert (tmp_path / "out.img").read_bytes() == bytes(want)
    g.close()


def test_an_initial_sync_keeps_the_order_of_a_batch(tmp_path: Path) -> None:
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"a" * 32), z(2, 0, 16, kind=KIND_TRIM), w(3, 8, b"b" * 4),
               z(4, 10, 1)])
    assert replica(g) == image(64, (8, b"bb\0b"), (16, b"a" * 16))
    g.close()


def test_the_straight_path_fsyncs_the_replica_before_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal never says a change is durable before the replica holds it; and when
    the journal cannot take the batch, the source's resend makes the replica right."""
    g = open_group(tmp_path, [("a", 4096)])
    calls: List[str] = []
    real_fdatasync = os.fdatasync
    real_append = g.journal.append

    def fdatasync(fd: int) -> None:
        calls.append("replica" if fd in g.fds else "other")
        real_fdatasync(fd)

    def append(records):
        calls.append("journal")
        return real_append(records)

    monkeypatch.setattr(os, "fdatasync", fdatasync)  # the replica writer's (aio.py) too
    monkeypatch.setattr(g.journal, "append", append)
    accept(g, [w(1, 0, b"a" * 100, flags=RESYNC)])
    # ("other": the replica's chunk digests, digests.py, written once the replica is.)
    assert [c for c in calls if c != "other"][:2] == ["replica", "journal"]

    def full(records):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(g.journal, "append", full)
    with pytest.raises(OSError):
        accept(g, [w(2, 50, b"b" * 100, flags=RESYNC)])
    assert g.durable() == [(1, 1)]  # not acked: the source sends it again
    crash(g)
    g = open_group(tmp_path, [("a", 4096)])
    assert accept(g, [w(2, 50, b"b" * 100, flags=RESYNC), consistent(3)]) == 2
    assert replica(g)[:150] == b"a" * 50 + b"b" * 100
    g.close()


def test_the_straight_path_waits_for_a_held_disk_and_skips_a_whole_one(
        tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 64), ("b", 64)])
    accept(g, [w(1, 0, b"A" * 8, flags=RESYNC), consistent(2)])  # a is whole
    accept(g, [w(3, 0, b"H" * 8, flags=RESYNC)])  # a resyncs: held back
    accept(g, [w(1, 0, b"B" * 8, disk=1, flags=RESYNC)])  # b's initial sync waits behind it
    assert replica(g, "a")[:8] == b"A" * 8 and replica(g, "b")[:8] == bytes(8)
    kinds = [(r.disk, r.kind) for r, _ in g.journal.read_from(g.journal.start)]
    assert (1, KIND_WRITE) in kinds and (0, KIND_WRITE) in kinds
    accept(g, [consistent(4)])  # a's resync ends: everything applies in order
    assert replica(g, "a")[:8] == b"H" * 8 and replica(g, "b")[:8] == b"B" * 8
    accept(g, [w(2, 8, b"C" * 8, disk=1)])  # nothing held: b's changes go straight again
    assert [(r.disk, r.kind) for r, _ in g.journal.read_from(g.journal.start)][-1] == (
        1, KIND_APPLIED)
    g.close()


def test_reopen_after_a_crash_while_holding(tmp_path: Path) -> None:
    g = made_consistent(tmp_path)
    g.checkpoint()
    accept(g, [w(4, 0, b"C" * 16, flags=INC), w(5, 40, b"D", flags=RESYNC)])
    held = replica(g)
    crash(g)
    g = open_group(tmp_path)
    assert replica(g) == held
    assert g.status()["disks"]["a"]["consistent"] is False
    assert g.durable() == [(1, 5)]
    accept(g, [consistent(6)])
    assert replica(g) == image(64, (0, b"C" * 16), (16, b"B" * 16), (40, b"D"))
    g.close()


def test_reopen_after_a_crash_with_the_marker_journaled(tmp_path: Path) -> None:
    g = made_consistent(tmp_path)
    g.checkpoint()
    accept(g, [w(4, 0, b"C" * 16, flags=INC), consistent(5), w(6, 20, b"x", flags=INC)])
    expected = replica(g)
    crash(g)
    g = open_group(tmp_path)
    assert replica(g) == expected
    assert replica(g)[:21] == b"C" * 16 + b"B" * 5  # record 6 is held again
    g.close()


def test_reopen_with_other_sizes_is_a_size_mismatch(tmp_path: Path) -> None:
    g = open_group(tmp_path, [("a", 64), ("b", 128)])
    accept(g, [w(1, 0, b"keep")])
    g.close()
    for disks in ([("a", 64), ("b", 256)], [("a", 32), ("b", 128)], [("a", 64)],
                  [("b", 128), ("a", 64)], [("a", 64), ("b", 128), ("c", 8)]):
        with pytest.raises(SizeMismatch):
            open_group(tmp_path, disks)
    g = open_group(tmp_path, [("a", 64), ("b", 128)])
    assert replica(g, "a")[:4] == b"keep"
    assert g.durable() == [(1, 1), (0, 0)]
    g.close()


def test_a_refused_new_protection_changes_nothing(tmp_path: Path) -> None:
    g = open_group(tmp_path, protection="p1")
    accept(g, [w(1, 0, b"one"), w(2, 3, b"two")])
    g.close()
    with pytest.raises(SizeMismatch):
        open_group(tmp_path, [("a", 128)], protection="p2")
    g = open_group(tmp_path, protection="p1")
    assert g.durable() == [(1, 2)]
    accept(g, [w(3, 6, b"three")])
    assert replica(g)[:11] == b"onetwothree"
    g.close()


def test_a_new_protection_resets_the_cursors_and_keeps_the_replica(tmp_path: Path) -> None:
    g = made_consistent(tmp_path)
    accept(g, [w(4, 0, b"old stream")])
    old = replica(g)
    g.close()
    g = open_group(tmp_path, protection="p2")
    assert g.protection == "p2"
    assert g.durable() == [(0, 0)]
    assert replica(g) == old
    st = g.status()["disks"]["a"]
    assert st["ever_consistent"] is False and st["applied_seq"] == 0
    with pytest.raises(NoConsistentState):
        g.restore("a", str(tmp_path / "out.img"))
    # The new stream starts at 1 (it was a duplicate of the old stream's 1/1 before).
    assert accept(g, [w(1, 0, b"new stream", flags=RESYNC)]) == 1
    assert replica(g)[:10] == b"new stream"
    g.close()
    # Reopened without naming a protection: the saved one goes on.
    g = open_group(tmp_path, protection=None)
    assert g.protection == "p2" and g.durable() == [(1, 1)]
    g.close()


# -- a random stream, delivered with resends, crashes and reopens --------------------------------

SIZES = [48, 32]


@st.composite
def streams(draw) -> List[JRecord]:
    """Records of two disks in one timeline, with resync epochs and markers."""
    out: List[JRecord] = []
    seq = [0, 0]
    for _ in range(draw(st.integers(1, 25))):
        disk = draw(st.integers(0, 1))
        seq[disk] += 1
        kind = draw(st.sampled_from([KIND_WRITE, KIND_WRITE, KIND_ZERO, KIND_TRIM,
                                     KIND_CONSISTENT, KIND_FLUSH]))
        flags = draw(st.sampled_from([0, INC, RESYNC]))
        if kind in (KIND_CONSISTENT, KIND_FLUSH):
            out.append(JRecord(disk, 1, seq[disk], kind, 0, 0, 0, 0, None))
            continue
        offset = draw(st.integers(0, SIZES[disk] - 1))
        # Zero-length zeroes and trims are tested on their own.
        length = draw(st.integers(0 if kind == KIND_WRITE else 1, SIZES[disk] - offset))
        data = bytes([seq[disk] % 255 + 1]) * length if kind == KIND_WRITE else None
        out.append(JRecord(disk, 1, seq[disk], kind, flags, offset, length, 0, data))
    return out


def expected_replicas(journaled: List[JRecord]) -> List[bytes]:
    """The applier's rule, stated directly: apply in order; stop at the first inconsistent
    record of a disk that was whole once, unless that disk's marker comes later."""
    imgs = [bytearray(s) for s in SIZES]
    ever = [False, False]
    for i, r in enumerate(journaled):
        if r.flags & FLAG_INCONSISTENT and ever[r.disk] and not any(
                x.kind == KIND_CONSISTENT and x.disk == r.disk for x in journaled[i + 1:]):
            break
        if r.kind == KIND_WRITE:
            assert r.data is not None
            imgs[r.disk][r.offset:r.offset + r.length] = r.data
        elif r.kind in (KIND_ZERO, KIND_TRIM):
            imgs[r.disk][r.offset:r.offset + r.length] = bytes(r.length)
        elif r.kind == KIND_CONSISTENT:
            ever[r.disk] = True
    return [bytes(b) for b in imgs]


def deliver(path: Path, stream: List[JRecord], data: st.DataObject,
            lose_writes: bool) -> None:
    """Send ``stream`` in batches that resend a few records, checkpointing, closing or
    crashing between batches; with ``lose_writes`` a crash also loses every replica write
    since the last checkpoint. The replicas must always be what the rule says."""
    disks = list(zip("ab", SIZES))
    g = open_group(path, disks)
    synced = [bytes(s) for s in SIZES]  # the replicas as of the last checkpoint
    choices = ["go on", "checkpoint", "close", "crash"]
    if lose_writes:
        choices.append("crash losing replica writes")
    sent = 0
    while sent < len(stream):
        start = data.draw(st.integers(max(0, sent - 3), sent), label="resend from")
        end = data.draw(st.integers(sent + 1, len(stream)), label="up to")
        assert accept(g, stream[start:end]) == end - sent
        sent = end
        assert [replica(g, d) for d in "ab"] == expected_replicas(stream[:sent])
        # A promotion ends with a checkpoint (replicas fdatasynced, then meta.json).
        synced = [replica(g, d) for d in "ab"]
        what = data.draw(st.sampled_from(choices))
        if what in ("checkpoint", "close"):
            synced = [replica(g, d) for d in "ab"]
        if what == "checkpoint":
            g.checkpoint()
        elif what == "close":
            g.close()
            g = open_group(path, disks)
        elif what.startswith("crash"):
            crash(g)
            if what == "crash losing replica writes":
                for d, content in zip("ab", synced):
                    Path(g.replica_path(d)).write_bytes(content)
            g = open_group(path, disks)
        assert [replica(g, d) for d in "ab"] == expected_replicas(stream[:sent])
        last = [max((r.seq for r in stream[:sent] if r.disk == d), default=0) for d in (0, 1)]
        assert g.durable() == [(1 if s else 0, s) for s in last]
    g.close()


@settings(deadline=None, max_examples=100,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams(), data=st.data())
def test_random_streams_with_resends_and_crashes_give_the_expected_replicas(
        tmp_path_factory: pytest.TempPathFactory, stream: List[JRecord],
        data: st.DataObject) -> None:
    deliver(tmp_path_factory.mktemp("g"), stream, data, lose_writes=True)


@settings(deadline=None, max_examples=50,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(stream=streams(), data=st.data())
def test_random_streams_with_checkpoints_inside_accept(
        tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch,
        stream: List[JRecord], data: st.DataObject) -> None:
    # The applier checkpoints (meta, then old segments dropped) after every written byte.
    monkeypatch.setattr(applier, "CHECKPOINT_BYTES", 1)
    deliver(tmp_path_factory.mktemp("g"), stream, data, lose_writes=False)


def test_a_checkpoint_at_a_segments_end_inside_the_applier_is_not_undone(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The applier checkpoints after the last record of a segment it applies: the
    # checkpoint moves the applied position on to the next segment and drops this one. The
    # applier used to step back onto the dropped segment, and the next checkpoint failed.
    monkeypatch.setattr(applier, "CHECKPOINT_BYTES", 1)
    g = open_group(tmp_path)
    accept(g, [w(1, 0, b"x", flags=RESYNC), consistent(2)])
    accept(g, [w(3, 0, b"y")])
    accept(g, [w(4, 1, b"z")])
    assert replica(g)[:3] == b"yz\0"
    assert g.applied[0] == g.journal.segments()[0]
    g.close()


def test_records_journaled_whole_are_checkpointed_before_the_straight_path_resumes(
        tmp_path: Path) -> None:
    """b's first change waits behind a's resync, journaled whole; b's next one goes
    straight to the replica. After a crash, the journal is not re-applied from before the
    first: it would put b's older byte back over the newer one."""
    disks = [("a", 64), ("b", 64)]
    g = open_group(tmp_path, disks)
    accept(g, [consistent(1), w(2, 0, b"a", flags=INC)])   # a is whole, then resyncs: held
    accept(g, [w(1, 0, b"\x02", disk=1), consistent(3)])  # b's 1 waits, then all applied
    accept(g, [w(2, 0, b"\x03", disk=1)])                  # straight to b's replica
    assert replica(g, "b")[:1] == b"\x03"
    crash(g)
    g = open_group(tmp_path, disks)
    assert replica(g, "b")[:1] == b"\x03" and replica(g, "a")[:1] == b"a"
    g.close()


def test_saving_settings_does_not_move_where_a_restart_re_applies_from(tmp_path: Path) -> None:
    # a is whole, b's initial sync runs: a's changes are applied with no checkpoint after
    # them. Saving the limits (or a tag) writes meta.json; its applied position must stay
    # where the replicas were last made durable, or a crash would lose a's change.
    disks = [("a", 64), ("b", 64)]
    g = open_group(tmp_path, disks)
    accept(g, [w(1, 0, b"x" * 64, flags=RESYNC), consistent(2)])
    g.checkpoint()
    accept(g, [w(3, 0, b"new")])
    g.set_limits(3600, 1 << 30)
    crash(g)
    Path(g.replica_path("a")).write_bytes(b"x" * 64)  # the write since the checkpoint is lost
    g = open_group(tmp_path, disks)
    assert replica(g, "a")[:4] == b"newx"
    g.close()
