"""The any-point-in-time pieces as plain classes: the checkpoint cutter, the journal map, the
journal's index and torn tail, and a target group's window, limit, restore and crashes."""

from __future__ import annotations

import bisect
import json
import os
import random
import time
import zlib
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest

from agent import checkpoints as cps
from agent.checkpoints import Checkpoint, Cutter
from agent.protocol import frames
from agent.target.group import NoConsistentState, TargetGroup
from agent.target.journal import Journal, JournalCorrupt, JRecord
from formats import jindex
from formats import jmap as journal_map
from formats.localwire import (
    FLAG_INCONSISTENT,
    KIND_CONSISTENT,
    KIND_WRITE,
    KIND_ZERO,
    Record,
)

# -- the cutter ---------------------------------------------------------------------------


def rec(seq: int, t: int, flags: int = 0, kind: int = KIND_WRITE, gen: int = 1) -> Record:
    return Record(seq, t, 0, 0, gen, kind, flags, None)


def cp(t: int, kind: str = "user") -> Checkpoint:
    return Checkpoint("c%d" % t, t, kind)


def test_cut_waits_for_every_watermark_and_takes_records_up_to_t() -> None:
    c = Cutter(2)
    c.reset([(1, 0), (1, 0)])
    c.forwarded(0, [rec(1, 10), rec(2, 20)])
    req = c.request(cp(25))
    c.forwarded(0, [rec(3, 24), rec(4, 30)])  # 24 completed before T, came later
    c.watermark(0, 31)
    assert c.resolve() == []  # disk 1 has not said it is past 25
    c.watermark(1, 26)
    done = c.resolve()
    assert done == [req] and req.result == "ok"
    assert req.checkpoint.cut == [(1, 3), (1, 0)]


def test_inconsistent_disk_makes_the_checkpoint_impossible() -> None:
    c = Cutter(1)
    c.reset([(1, 5)])
    req = c.request(cp(100))
    # The disk went to its dirty map before 100: the next records carry the flag.
    c.forwarded(0, [rec(6, 150, FLAG_INCONSISTENT), rec(7, 160, kind=KIND_CONSISTENT)])
    c.watermark(0, 170)
    assert c.resolve() == [req]
    assert req.result != "ok" and "resync" in str(req.result)
    later = c.request(cp(200))
    c.watermark(0, 201)
    c.resolve()
    assert later.result == "ok" and later.checkpoint.cut == [(1, 7)]


def test_reset_fails_what_is_pending_and_entries_fold() -> None:
    c = Cutter(1)
    c.reset([(1, 0)])
    c.forwarded(0, [rec(i, i * 10) for i in range(1, 100)])
    req = c.request(cp(5000))
    failed = c.reset([(2, 0)])
    assert failed == [req] and req.result and "lost" in req.result
    req2 = c.request(cp(6000))
    c.watermark(0, 6000)
    c.resolve()
    assert req2.checkpoint.cut == [(2, 0)]


def test_parse_wire_checks_every_field() -> None:
    good = {"id": "abc123", "time_ns": 5, "kind": "auto", "tag": None, "cut": [[1, 2]]}
    assert cps.parse_wire(good, 1).cut == [(1, 2)]
    for bad in ({**good, "id": "../x"}, {**good, "kind": "other"}, {**good, "tag": 5},
                {**good, "cut": [[1, 2], [1, 3]]}, {**good, "cut": [[1, -2]]},
                {**good, "cut": [[True, 2]]}, "x"):
        with pytest.raises(frames.ProtocolError):
            cps.parse_wire(bad, 1)


def test_choose_by_id_tag_and_time() -> None:
    items = [Checkpoint("a", 1, "auto", None, [], 100), Checkpoint("b", 2, "user", "x", [], 200),
             Checkpoint("c", 3, "user", "x", [], 300)]
    assert cps.choose(items, "a").id == "a"
    assert cps.choose(items, "x").id == "c"
    assert cps.choose(items, at_wall_ns=250).id == "b"
    assert cps.choose(items).id == "c"
    with pytest.raises(cps.CheckpointError):
        cps.choose(items, "nope")
    with pytest.raises(cps.CheckpointError):
        cps.choose(items, at_wall_ns=50)
    with pytest.raises(cps.CheckpointError):
        cps.choose([])


# -- the extent map -----------------------------------------------------------------------


def _segment_indexes(records: List[tuple], per_segment: int
                     ) -> List[Tuple[int, jindex.SegmentIndex, int]]:
    """Index files for records ``(disk, kind, gen, seq, offset, length, pos)`` cut into
    segments of ``per_segment`` records, written and read back as the view reads them."""
    out = []
    for n, i in enumerate(range(0, len(records), per_segment)):
        chunk = records[i:i + per_segment]
        entries = b"".join(jindex.ENTRY.pack(d, k, 0, g, ln, sq, off, 0, pos)
                           for d, k, g, sq, off, ln, pos in chunk)
        covers = chunk[-1][6] + 48 + chunk[-1][5] if chunk else 0
        got = jindex.unpack_index(jindex.pack_idx(entries, covers), covers)
        assert got is not None and got[1] == 2 and got[0].entries == entries
        out.append((n + 1, got[0], covers))
    return out


@pytest.mark.parametrize("size,sizes,per_segment", [
    (1 << 20, [1, 512, 4096, 70000, 199999], 300),
    (1 << 18, [1, 100, 512, 700, 4096], 150),    # many small overlapping pieces
    (1 << 20, [512, 4096], 5000),                 # one segment
])
def test_journal_map_matches_a_model(size: int, sizes: List[int], per_segment: int) -> None:
    rng = random.Random(3)
    replica = rng.randbytes(size)
    base, upto = (1, 200), (2, 300)  # the replica's point, the view's point
    model = bytearray(replica)
    records = []
    data: Dict[Tuple[int, int], bytes] = {}  # (segment, position of the data) -> bytes
    pos = 0
    for i in range(2000):
        gen, seq = (1, i + 1) if i < 1000 else (2, i - 999)
        length = rng.choice(sizes)
        off = rng.randrange(0, size - length)
        disk = 0 if rng.random() < 0.8 else 1
        kind = KIND_ZERO if rng.random() < 0.1 else KIND_WRITE
        seg = len(records) // per_segment + 1
        if len(records) % per_segment == 0:
            pos = 0
        records.append((disk, kind, gen, seq, off, length, pos))
        blob = rng.randbytes(length) if kind == KIND_WRITE else bytes(length)
        if kind == KIND_WRITE:
            data[(seg, pos + 48)] = blob
        if disk == 0 and base < (gen, seq) <= upto:
            model[off:off + length] = blob
        pos += 48 + (length if kind == KIND_WRITE else 0)
    jmap = journal_map.JournalMap(0, base, upto)
    for segno, ix, covers in _segment_indexes(records, per_segment):
        jmap.add_segment(segno, ix, covers)
    starts = {k: sorted(p for s, p in data if s == k) for k in {s for s, _p in data}}

    def source_bytes(src: Tuple[int, int], n: int) -> bytes:
        seg, at = src
        i = bisect.bisect_right(starts[seg], at) - 1
        p = starts[seg][i]
        blob = data[(seg, p)]
        assert at + n <= p + len(blob)
        return blob[at - p:at - p + n]

    for _ in range(400):
        off = rng.randrange(0, size - 1)
        length = rng.randrange(1, min(300000, size - off) + 1)
        out = bytearray()
        pieces = jmap.lookup(off, length)
        assert pieces[0][0] == off and pieces[-1][1] == off + length
        assert all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
        for s, e, src in pieces:
            if src is None:
                out += replica[s:e]
            elif src == journal_map.ZERO:
                out += bytes(e - s)
            else:
                out += source_bytes(src, e - s)
        assert out == model[off:off + length]


def test_a_segment_outside_the_window_is_left_out() -> None:
    records = [(0, KIND_WRITE, 1, i, i * 4096, 4096, i * 5000) for i in range(1, 11)]
    segs = _segment_indexes(records, 5)
    jmap = journal_map.JournalMap(0, (1, 5), (1, 10))  # the first segment's records are applied
    for segno, ix, covers in segs:
        jmap.add_segment(segno, ix, covers)
    assert jmap.segments == 1 and jmap.pieces() == 5
    assert jmap.lookup(4096, 4096) == [(4096, 8192, None)]
    assert jmap.lookup(6 * 4096, 4096) == [(6 * 4096, 7 * 4096, (2, 6 * 5000 + 48))]


def test_version_1_index_files_are_read_and_migrated(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=10000)
    for i in range(1, 30):
        j.append([wrec(i, i * 512, bytes([i]) * 1000)])
    segs = j.segments()[:-1]
    j.close()
    want = {}
    for segno in segs:
        path = jindex.idx_path(j.path(segno))
        with open(path, "rb") as f:
            v2 = f.read()
        covers = os.path.getsize(j.path(segno))
        entries = jindex.unpack_idx(v2, covers)
        assert entries is not None and jindex.idx_version(v2) == 2
        want[segno] = v2
        v1 = entries + jindex.TRAILER.pack(jindex.IDX_MAGIC_V1, zlib.crc32(entries), covers)
        got = jindex.unpack_index(v1, covers)
        assert got is not None and got[1] == 1
        assert got[0] == jindex.unpack_index(v2, covers)[0]  # type: ignore[index]
        with open(path, "wb") as f:
            f.write(v1)
    j2 = Journal(str(tmp_path), segment_max=10000)
    assert j2.migrated_indexes == len(segs) and j2.rebuilt_indexes == 0
    for segno in segs:
        with open(jindex.idx_path(j2.path(segno)), "rb") as f:
            assert f.read() == want[segno]
    j2.close()


def test_an_index_of_another_block_size_is_sorted_again(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=10000)
    for i in range(1, 30):
        j.append([wrec(i, i * 70000, bytes([i]) * 1000)])
    segno = j.segments()[0]
    j.close()
    path = jindex.idx_path(j.path(segno))
    with open(path, "rb") as f:
        good = f.read()
    covers = os.path.getsize(j.path(segno))
    # The file labelled with 64 KiB blocks: its keys must not be used as they are.
    at = len(good) - jindex.TRAILER.size - jindex.COUNTS.size
    n, m, d, _shift = jindex.COUNTS.unpack_from(good, at)
    body = good[:at] + jindex.COUNTS.pack(n, m, d, 16)
    other = body + jindex.TRAILER.pack(jindex.IDX_MAGIC, zlib.crc32(body), covers)
    assert not jindex.idx_current(other) and jindex.idx_current(good)
    got = jindex.unpack_index(other, covers)
    assert got is not None and got[0] == jindex.unpack_index(good, covers)[0]  # type: ignore
    with open(path, "wb") as f:
        f.write(other)
    j2 = Journal(str(tmp_path), segment_max=10000)
    assert j2.migrated_indexes == 1
    with open(path, "rb") as f:
        assert f.read() == good
    j2.close()


# -- the journal --------------------------------------------------------------------------


def wrec(seq: int, off: int, data: bytes, disk: int = 0, gen: int = 1,
         flags: int = 0) -> JRecord:
    return JRecord(disk, gen, seq, KIND_WRITE, flags, off, len(data), seq, data)


def test_closed_segments_get_an_index_and_a_lost_one_is_rebuilt(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=10000)
    for i in range(1, 30):
        j.append([wrec(i, i * 512, bytes([i]) * 1000)])
    segs = j.segments()
    assert len(segs) > 2
    idx = jindex.idx_path(j.path(segs[0]))
    assert os.path.exists(idx)
    entries = j.index(segs[0])
    j.close()
    os.unlink(idx)
    with open(jindex.idx_path(j.path(segs[1])), "r+b") as f:
        f.write(b"\xff")  # fails its crc
    j2 = Journal(str(tmp_path), segment_max=10000)
    assert j2.rebuilt_indexes == 2 and j2.index(segs[0]) == entries
    assert jindex.read_idx(j2.path(segs[0]), os.path.getsize(j2.path(segs[0]))) == entries
    # The plugin's header scan agrees with the agent's index.
    last = j2.segments()[-1]
    assert jindex.scan_headers(j2.path(last), j2.segment_size(last)) == j2.index(last)
    j2.close()


def test_flipped_byte_in_a_closed_segment_without_index_is_damage(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=5000)
    for i in range(1, 10):
        j.append([wrec(i, 0, b"x" * 3000)])
    first = j.segments()[0]
    j.close()
    os.unlink(jindex.idx_path(j.path(first)))
    with open(j.path(first), "r+b") as f:
        f.seek(100)
        f.write(b"y")
    j2 = Journal(str(tmp_path), segment_max=5000)  # opens: the damage is kept and listed
    assert [(d.segment, d.offset, d.end) for d in j2.damage] == [(first, 0, 3048)]
    # The damaged record stays out of the index; the one after it is kept.
    assert [e[8] for e in jindex.entries(j2.index(first))] == [3048]
    with pytest.raises(JournalCorrupt, match="byte 0"):
        list(j2.read_from(j2.start))
    j2.close()


def test_flipped_acked_tail_is_damage_and_a_torn_tail_after_it_is_cut(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    j.append([wrec(1, 0, b"a" * 100)])
    end = j.end
    j.append([wrec(2, 0, b"b" * 100)])
    j.close()
    path = j.path(end[0])
    with open(path, "r+b") as f:
        f.seek(end[1] + 60)
        f.write(b"!")  # the second record's data: fails its checksum, but it was acked
    j2 = Journal(str(tmp_path))
    assert j2.dropped_tail == 0 and j2.end == (end[0], end[1] + 148)
    assert [(d.offset, d.end, d.disk_offset) for d in j2.damage] == [(end[1], end[1] + 148, 0)]
    with pytest.raises(JournalCorrupt, match="byte %d" % end[1]):
        list(j2.read_from(j2.start))
    j2.close()
    with open(path, "ab") as f:
        f.write(b"FJR\x01partial")  # never acked
    j3 = Journal(str(tmp_path))
    assert j3.dropped_tail == 11 and [e[5] for e in jindex.entries(j3.index(end[0]))] == [1]
    assert len(j3.damage) == 1
    j3.close()


# -- a target group: window, limit, restore, crashes ---------------------------------------

SIZE = 256 * 1024


class Model:
    """What each disk holds after each record: the reference for every check."""

    def __init__(self, ndisks: int) -> None:
        self.disks = [bytearray(SIZE) for _ in range(ndisks)]
        self.seq = [0] * ndisks
        self.at: Dict[str, List[bytes]] = {}

    def write(self, disk: int, off: int, data: bytes) -> JRecord:
        self.seq[disk] += 1
        self.disks[disk][off:off + len(data)] = data
        return JRecord(disk, 1, self.seq[disk], KIND_WRITE, 0, off, len(data), 0, data)

    def zero(self, disk: int, off: int, length: int) -> JRecord:
        self.seq[disk] += 1
        self.disks[disk][off:off + length] = bytes(length)
        return JRecord(disk, 1, self.seq[disk], KIND_ZERO, 0, off, length, 0, None)

    def consistent(self, disk: int) -> JRecord:
        self.seq[disk] += 1
        return JRecord(disk, 1, self.seq[disk], KIND_CONSISTENT, 0, 0, 0, 0, None)

    def checkpoint(self, cid: str, tag: Optional[str] = None) -> Checkpoint:
        self.at[cid] = [bytes(d) for d in self.disks]
        return Checkpoint(cid, time.monotonic_ns(), "user", tag, [(1, s) for s in self.seq])


def open_group(path: Path, **kw: object) -> TargetGroup:
    return TargetGroup(str(path), "g", [("a", SIZE), ("b", SIZE)], protection="p",
                       segment_max=kw.pop("segment_max", 16 * 1024), **kw)  # type: ignore


def fill(group: TargetGroup, model: Model, rounds: int, seed: int) -> List[str]:
    rng = random.Random(seed)
    ids = []
    for r in range(rounds):
        batch = []
        for _ in range(3):
            disk = rng.randrange(2)
            if rng.random() < 0.15:
                batch.append(model.zero(disk, rng.randrange(0, SIZE - 8192, 512), 8192))
            else:
                n = rng.choice([512, 4096])
                batch.append(model.write(disk, rng.randrange(0, SIZE - n, 512),
                                         rng.randbytes(n)))
        cid = "r%d" % r + str(seed)
        ids.append(cid)
        group.accept(batch, [model.checkpoint(cid)], (time.time_ns(), time.monotonic_ns()))
    return ids


def start(path: Path, model: Model, **kw: object) -> TargetGroup:
    g = open_group(path, **kw)
    g.accept([model.consistent(0), model.consistent(1)])  # both disks whole: history begins
    return g


def restored(group: TargetGroup, disk: str, tmp: Path, ref: Optional[str] = None) -> bytes:
    dest = tmp / ("r-%s-%s-%d" % (disk, ref, time.monotonic_ns()))
    group.restore(disk, str(dest), ref)
    return dest.read_bytes()


def replica(group: TargetGroup, disk: str) -> bytes:
    with open(group.replica_path(disk), "rb") as f:
        return f.read()


def check_all(group: TargetGroup, model: Model, tmp: Path) -> None:
    for c in group.checkpoints:
        for i, name in enumerate(("a", "b")):
            assert restored(group, name, tmp, c.id) == model.at[c.id][i], (c.id, name)


def test_replica_holds_the_oldest_point_and_every_checkpoint_restores(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model)
    fill(g, model, 40, seed=1)
    assert replica(g, "a") == bytes(SIZE)  # nothing promoted inside the window
    assert len(g.checkpoints) == 40
    check_all(g, model, tmp_path)
    assert restored(g, "a", tmp_path) == model.disks[0]
    g.close()
    g = open_group(tmp_path / "g")  # reopened: the same checkpoints, the same bytes
    assert len(g.checkpoints) == 40
    check_all(g, model, tmp_path)
    g.close()


def test_history_window_promotes_old_segments_byte_for_byte(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model, history_s=3600)
    ids = fill(g, model, 60, seed=2)
    segs = g.journal.segments()
    assert len(segs) > 4
    old = time.time() - 7200
    for s in segs[:3]:
        os.utime(g.journal.path(s), (old, old))  # these left the window
    g.maintain()
    assert g.journal.segments()[0] == segs[3]
    assert not os.path.exists(g.journal.path(segs[0]))
    assert ids[0] not in [c.id for c in g.checkpoints]
    st = g.disks[0]
    first = g.checkpoints[0]
    # The replica is a state the model went through: the one at its applied point.
    assert (st.applied_gen, st.applied_seq) <= first.cut[0]
    check_all(g, model, tmp_path)
    assert restored(g, "b", tmp_path) == model.disks[1]
    assert not g.short_history
    g.close()


def test_journal_limit_promotes_and_alerts(tmp_path: Path, caplog: pytest.LogCaptureFixture
                                           ) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model, journal_max=64 * 1024)
    fill(g, model, 80, seed=3)
    assert g.journal.size() <= 64 * 1024 + 16 * 1024 + 8192
    assert g.short_history and "ALERT" in caplog.text
    assert g.status()["history_short"] is True
    check_all(g, model, tmp_path)
    for i, name in enumerate(("a", "b")):
        assert restored(g, name, tmp_path) == model.disks[i]
    g.close()


def test_a_view_pins_the_group(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model, journal_max=32 * 1024)
    fill(g, model, 5, seed=4)
    c, specs = g.view_spec(g.checkpoints[-1].id, None)
    before = g.journal.segments()
    fill(g, model, 40, seed=5)
    assert set(before) <= set(g.journal.segments())  # nothing promoted while pinned
    reader = journal_map.open_reader(specs[1])
    assert c is not None and reader.pread(SIZE, 0) == model.at[c.id][1]
    reader.close()
    g.unpin()
    g.maintain()
    assert not set(before) <= set(g.journal.segments())
    g.close()


def test_crash_between_promotion_and_its_metadata_reapplies(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model, history_s=3600)
    fill(g, model, 30, seed=6)
    segs = g.journal.segments()
    old = time.time() - 7200
    for s in segs[:2]:
        os.utime(g.journal.path(s), (old, old))
    # Promotion applies to the replicas, then "crashes" before meta.json and the unlinks.
    g._apply((segs[2], 0))
    g.journal.close()  # no close(): nothing else is saved
    g2 = open_group(tmp_path / "g")
    check_all(g2, model, tmp_path)
    assert restored(g2, "a", tmp_path) == model.disks[0]
    g2.close()


def test_failover_crash_half_way_is_finished_at_open(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model)
    ids = fill(g, model, 10, seed=7)
    g.close()
    meta_path = tmp_path / "g" / "meta.json"
    meta = json.loads(meta_path.read_text())
    cut = next(c for c in open_group(tmp_path / "g").checkpoints if c.id == ids[4]).cut
    meta["failover"] = {"state": "applying", "checkpoint": None, "cut": [list(p) for p in cut],
                        "wall_ns": 1}
    meta_path.write_text(json.dumps(meta))
    g = open_group(tmp_path / "g")
    assert g.failover is not None and g.failover["state"] == "done"
    from agent.target import failover
    live = {d: Path(failover.live_path(g, d)).read_bytes() for d in ("a", "b")}
    assert live["a"] == model.at[ids[4]][0] and live["b"] == model.at[ids[4]][1]
    from agent.protocol.frames import ProtocolError
    with pytest.raises(ProtocolError):
        g.accept([model.write(0, 0, b"x")])
    g.close()


def test_checkpoint_before_its_records_is_refused(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model)
    ahead = Checkpoint("ahead", 1, "user", None, [(1, 99), (1, 1)])
    from agent.protocol.frames import ProtocolError
    with pytest.raises(ProtocolError):
        g.accept([], [ahead])
    fresh, ids = g.accept([], [model.checkpoint("ok")])
    assert (fresh, ids) == (0, ["ok"])
    assert g.accept([], [model.checkpoint("ok")]) == (0, ["ok"])  # a resend: journaled once
    assert [c.id for c in g.checkpoints] == ["ok"]
    g.close()


def test_no_point_before_the_initial_sync_ends(tmp_path: Path) -> None:
    g = open_group(tmp_path / "g")
    with pytest.raises(NoConsistentState):
        g.restore("a", str(tmp_path / "x"))
    g.close()


def test_resync_holds_the_newest_state_back(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model)
    fill(g, model, 3, seed=8)
    good = bytes(model.disks[0])
    model.seq[0] += 1
    g.accept([JRecord(0, 1, model.seq[0], KIND_WRITE, FLAG_INCONSISTENT, 0, 4, 0, b"zzzz")])
    out = g.restore("a", str(tmp_path / "held"))
    assert out["resyncing"] and (tmp_path / "held").read_bytes() == good
    g.close()



# -- views that cannot start, promotion that fails ------------------------------------------


def test_a_view_that_cannot_start_unpins_and_says_why(tmp_path: Path) -> None:
    from agent.target.views import Views
    model = Model(2)
    g = start(tmp_path / "g", model)
    fill(g, model, 2, seed=9)
    views = Views(str(tmp_path / "data"))
    os.rename(g.replica_path("b"), str(tmp_path / "away"))  # nbdkit cannot open it
    with pytest.raises(OSError, match="nbdkit for the view exited"):
        views.open(g, None, None, test=False)
    assert g.pins == 0 and views.views == {}
    g.failover = {"state": "done", "checkpoint": None, "cut": [], "wall_ns": 0}
    with pytest.raises(OSError, match="nbdkit for the view exited"):
        views.serve_live(g)
    assert views.views == {}
    os.rename(str(tmp_path / "away"), g.replica_path("b"))
    g.failover = None
    v = views.open(g, g.checkpoints[-1].id, None, test=False)
    assert g.pins == 1 and set(v["disks"]) == {"a", "b"}
    views.close(v["id"], {"g": g})
    assert g.pins == 0
    g.close()


def test_promotion_failure_is_logged_and_the_agent_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    import trio

    from agent import target
    model = Model(2)
    site = target.TargetSite(str(tmp_path / "data"), "B")
    g = start(Path(site.root) / "g", model, history_s=1)
    fill(g, model, 30, seed=10)
    site.groups["g"] = g
    os.unlink(g.journal.path(g.journal.segments()[0]))  # promotion will not find it

    async def run() -> None:
        with trio.move_on_after(1.5):
            await site._maintain()

    trio.run(run)
    assert "promotion failed" in caplog.text
    g.journal.close()


def test_a_restarted_splitter_fails_what_is_pending() -> None:
    c = Cutter(1)
    c.reset([(1, 3)])
    req = c.request(cp(100))
    assert c.restarted(0) == [req] and "restarted" in str(req.result)
    c.forwarded(0, [rec(1, 150, FLAG_INCONSISTENT, gen=2)])
    c.watermark(0, 200)
    assert c.resolve() == []


def test_the_newest_state_moves_on_when_the_resync_ends(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model)
    fill(g, model, 3, seed=12)
    held = bytes(model.disks[0])
    model.seq[0] += 1
    g.accept([JRecord(0, 1, model.seq[0], KIND_WRITE, FLAG_INCONSISTENT, 0, 4, 0, b"zzzz")])
    model.disks[0][0:4] = b"zzzz"
    fill(g, model, 2, seed=13)  # the other disk goes on; this one is still held
    assert g.status()["disks"]["a"]["consistent"] is False
    assert restored(g, "a", tmp_path) == held
    g.accept([model.consistent(0)])  # the resync ended
    assert g.status()["disks"]["a"]["consistent"] is True
    assert restored(g, "a", tmp_path) == model.disks[0]
    assert restored(g, "b", tmp_path) == model.disks[1]
    g.close()


def test_status_does_not_wait_for_a_busy_group(tmp_path: Path) -> None:
    model = Model(2)
    g = start(tmp_path / "g", model)
    with g._lock:  # a long restore or batch holds it: the snapshot of the last change
        started = time.monotonic()
        st = g.status()
        assert time.monotonic() - started < 0.1
    assert st["disks"]["a"]["ever_consistent"] and st["stale"] is False  # never an old answer
    fill(g, model, 2, seed=14)
    fresh = g.status()
    assert fresh["checkpoints"] > st["checkpoints"]  # every change publishes a new one
    with g._lock:
        busy = g.status()
    assert busy["checkpoints"] == fresh["checkpoints"]
    assert busy["disks"] == fresh["disks"] and busy["journal_bytes"] == fresh["journal_bytes"]
    g.close()
