"""Site B never hands back a journal byte it cannot vouch for, and damage stays in its group.

Real agents (two sites on loopback), real splitters and views: bytes of B's journal are
flipped or cut with B stopped or running, then restore, views, status and a second group
are checked. The open-time classifier has its unit tests at the end."""

from __future__ import annotations

import errno
import json
import random
import shutil
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import nbd
import pytest
from conftest import Lab, first_difference, same_bytes, samples
from hypothesis import given, settings
from hypothesis import strategies as st
from test_faults import wait_for

from agent.errors import JournalCorrupt
from agent.target import damage
from agent.target.journal import Journal, JRecord, _holds, encode_header
from formats.records import DATA_KINDS, KIND_WRITE
from formats.segment import RECORD

MiB = 1024 * 1024
SIZE = 8 * MiB


def connect(uri: str) -> nbd.NBD:
    h = nbd.NBD()
    h.connect_uri(uri)
    return h


def write(uri: str, rng: random.Random, big: bool = False) -> None:
    """Random writes and a flush; ``big``: one 1 MiB write last, the record to damage."""
    h = connect(uri)
    for _ in range(20):
        h.pwrite(rng.randbytes(4096), rng.randrange(0, SIZE - 4096, 4096))
    if big:
        h.pwrite(rng.randbytes(MiB), 2 * MiB)
    h.flush()
    h.shutdown()


def synced(lab: Lab, group: str) -> None:
    lab.a.ferry("wait", group, "--synced", "--timeout", "120")
    deadline = time.monotonic() + 120
    while lab.a.status(group)["groups"][group]["state"] != "replicating":
        assert time.monotonic() < deadline, "group %s not replicating" % group
        time.sleep(0.1)


def checkpoint(lab: Lab, group: str, disk: Path, tag: str) -> Tuple[str, Path]:
    cid = lab.a.ferry("checkpoint", group, "--tag", tag).stdout.strip()
    copy = lab.work / ("%s-%s.img" % (group, tag))
    shutil.copyfile(disk, copy)
    lab.a.ferry("wait", group, "--synced", "--timeout", "120")
    return cid, copy


def journal_dir(lab: Lab, group: str) -> Path:
    return lab.b.data / "target" / group / "journal"


def segments(lab: Lab, group: str) -> List[Path]:
    return sorted(journal_dir(lab, group).glob("seg-*.fjr"))


def records(path: Path) -> List[Tuple[int, int, int]]:
    """(position, kind, length) of each record of a segment."""
    buf = path.read_bytes()
    out, pos = [], 0
    while pos + RECORD.size <= len(buf):
        kind, length = RECORD.unpack_from(buf, pos)[1], RECORD.unpack_from(buf, pos)[5]
        out.append((pos, kind, length))
        pos += RECORD.size + (length if kind in DATA_KINDS else 0)
    return out


def flip_big_write(path: Path) -> int:
    """Flip 4 bytes in the middle of the segment's last 1 MiB write; the byte flipped."""
    pos = [p for p, kind, length in records(path) if kind == KIND_WRITE and length == MiB][-1]
    at = pos + RECORD.size + MiB // 2
    with open(path, "r+b") as f:
        f.seek(at)
        old = f.read(4)
        f.seek(at)
        f.write(bytes(b ^ 0x5A for b in old))
    return pos


def restore(lab: Lab, group: str, disk: str, *point: str, check: bool = True
            ) -> Tuple[Path, object]:
    dest = lab.work / ("restored-%s-%s-%d.img" % (group, disk, time.monotonic_ns()))
    proc = lab.b.ferry("restore", group, "--disk", disk, "--to", str(dest), *point,
                       check=check)
    return dest, proc


def assert_refused(lab: Lab, group: str, disk: str, segment: Path, *point: str) -> str:
    dest, proc = restore(lab, group, disk, *point, check=False)
    err = proc.stderr.strip()  # type: ignore[attr-defined]
    assert proc.returncode != 0, proc  # type: ignore[attr-defined]
    assert len(err.splitlines()) == 1, err
    assert "group %s" % group in err and str(segment) in err and "byte" in err, err
    assert not dest.exists() and not Path(str(dest) + ".ferry-partial").exists()
    return err


def replica_status(lab: Lab, group: str) -> Dict:
    return lab.b.status(group)["replicas"][group]


def protected(lab: Lab, group: str, *extra: str) -> Tuple[Path, str]:
    disk = lab.image("%s-vda.img" % group, SIZE)
    uris = lab.protect(group, disk, extra=extra)
    synced(lab, group)
    return disk, uris[disk.stem]


def two_points(lab: Lab, group: str, disk: Path, uri: str, seed: int
               ) -> Tuple[Tuple[str, Path], Tuple[str, Path]]:
    rng = random.Random(seed)
    write(uri, rng)
    old = checkpoint(lab, group, disk, "old")
    write(uri, rng, big=True)
    new = checkpoint(lab, group, disk, "new")
    return old, new


def test_flip_in_the_newest_segment_with_b_stopped(sites: Lab) -> None:
    disk, uri = protected(sites, "g1")
    (old_id, old_copy), _new = two_points(sites, "g1", disk, uri, 1)
    sites.a.stop()  # no source: the damage stays unrepaired while it is looked at
    sites.b.stop()
    seg = segments(sites, "g1")[-1]
    pos = flip_big_write(seg)
    sites.b.start()

    st = replica_status(sites, "g1")
    assert st["state"] == "journal-damaged", st
    assert [(d["segment"], d["offset"], d["file"]) for d in st["damage"]] == \
        [(int(seg.stem[4:]), pos, str(seg))]
    assert st["damage"][0]["end"] == pos + RECORD.size + MiB
    # Its header still fits its place: the disk range the repair resends is known.
    assert (st["damage"][0]["disk"], st["damage"][0]["disk_offset"],
            st["damage"][0]["disk_length"]) == ("g1-vda", 2 * MiB, MiB)
    assert_refused(sites, "g1", "g1-vda", seg)
    assert_refused(sites, "g1", "g1-vda", seg, "--checkpoint", "new")
    restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", old_id)
    assert same_bytes(old_copy, restored), first_difference(old_copy, restored)
    assert "dropped a torn journal tail" not in sites.b.log.read_text()
    # Still damage at the next start, never a tail.
    sites.b.stop()
    sites.b.start()
    assert replica_status(sites, "g1")["state"] == "journal-damaged"
    restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", "old")
    assert same_bytes(old_copy, restored)

    # The source comes back: new writes are taken, and the damage, whose header B does not
    # trust (found by a scan), is repaired by resending the whole disk.
    durable = st["disks"]["g1-vda"]["durable_seq"]
    started = time.monotonic()
    sites.a.start()
    write(uri, random.Random(2))
    synced(sites, "g1")
    wait_for(lambda: replica_status(sites, "g1")["state"] == "receiving", 120,
             what="the repair: %s" % replica_status(sites, "g1"))
    print("newest segment flipped, B stopped: repaired in %.1f s after A started"
          % (time.monotonic() - started))
    st = replica_status(sites, "g1")
    assert st["disks"]["g1-vda"]["durable_seq"] > durable
    assert len(st["damage"]) == 1 and st["damage"][0]["repaired_at"], st["damage"]
    restored = sites.restore("g1", "g1-vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    assert_refused(sites, "g1", "g1-vda", seg, "--checkpoint", "new")  # the gap
    restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", "old")
    assert same_bytes(old_copy, restored)


def test_cut_into_acknowledged_records_is_damage(sites: Lab) -> None:
    disk, uri = protected(sites, "g1")
    (old_id, old_copy), _new = two_points(sites, "g1", disk, uri, 3)
    sites.a.stop()
    sites.b.stop()
    seg = segments(sites, "g1")[-1]
    pos = [p for p, kind, length in records(seg) if kind == KIND_WRITE and length == MiB][-1]
    size = seg.stat().st_size
    with open(seg, "r+b") as f:
        f.truncate(pos + 1000)  # mid-record, into what B acked
    sites.b.start()
    st = replica_status(sites, "g1")
    assert st["state"] == "journal-damaged"
    assert st["damage"][0]["offset"] == pos
    assert st["damage"][0]["missing"] == size - pos - 1000
    err = assert_refused(sites, "g1", "g1-vda", seg)
    assert "acknowledged bytes missing" in err
    restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", old_id)
    assert same_bytes(old_copy, restored)


def test_a_real_torn_tail_is_still_cut(sites: Lab) -> None:
    disk, uri = protected(sites, "g1")
    write(uri, random.Random(4), big=True)
    synced(sites, "g1")
    sites.b.stop()
    seg = segments(sites, "g1")[-1]
    size = seg.stat().st_size
    # A batch B never acked: the first part of a record, as a crash mid-append leaves it.
    rec = JRecord(0, 1, 10**9, KIND_WRITE, 0, 0, 65536, 0, b"t" * 65536)
    with open(seg, "ab") as f:
        f.write((encode_header(rec) + rec.data)[:30000])  # type: ignore[operator]
    sites.b.start()
    st = replica_status(sites, "g1")
    assert st["state"] == "receiving" and st["damage"] == [], st
    assert seg.stat().st_size == size
    assert "dropped a torn journal tail of 30000 bytes" in sites.b.log.read_text()
    restored = sites.restore("g1", "g1-vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)


def test_flip_in_a_closed_segment_with_b_stopped(sites: Lab) -> None:
    # History 60 s: a segment closes once its first record is 7.5 s old.
    disk, uri = protected(sites, "g1", "--history", "60s")
    rng = random.Random(5)
    write(uri, rng)
    zero_id, zero_copy = checkpoint(sites, "g1", disk, "zero")
    time.sleep(8)
    write(uri, rng, big=True)
    checkpoint(sites, "g1", disk, "one")
    time.sleep(8)
    write(uri, rng)
    checkpoint(sites, "g1", disk, "two")
    sites.a.stop()
    sites.b.stop()
    segs = segments(sites, "g1")
    closed = [s for s in segs[:-1] if any(k == KIND_WRITE and n == MiB
                                          for _p, k, n in records(s))]
    assert closed, [s.name for s in segs]
    flip_big_write(closed[-1])
    sites.b.start()
    st = replica_status(sites, "g1")
    assert st["state"] == "journal-damaged", st
    assert [d["file"] for d in st["damage"]] == [str(closed[-1])]
    assert_refused(sites, "g1", "g1-vda", closed[-1])
    assert_refused(sites, "g1", "g1-vda", closed[-1], "--checkpoint", "one")
    restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", zero_id)
    assert same_bytes(zero_copy, restored), first_difference(zero_copy, restored)
    # The agent keeps it: promotion stops before the damage, the agent stays up.
    time.sleep(3)
    assert sites.b.proc is not None and sites.b.proc.poll() is None
    assert replica_status(sites, "g1")["state"] == "journal-damaged"


def test_flip_with_b_running(sites: Lab) -> None:
    disk, uri = protected(sites, "g1")
    (old_id, old_copy), (new_id, new_copy) = two_points(sites, "g1", disk, uri, 6)
    disk2, uri2 = protected(sites, "g2")
    view = json.loads(sites.b.ferry("view", "g1", "--checkpoint", new_id, "--json").stdout)
    sites.a.stop()  # no source: nothing is repaired while it is looked at
    seg = segments(sites, "g1")[-1]
    flip_big_write(seg)

    # The view: EIO over the damaged record, good bytes elsewhere.
    h = connect(view["disks"]["g1-vda"])
    with pytest.raises(nbd.Error) as e:
        h.pread(4096, 2 * MiB + MiB // 2)
    assert e.value.errnum == errno.EIO, (e.value.errnum, e.value.string)
    assert h.pread(4096, 0) == new_copy.read_bytes()[:4096]
    h.shutdown()
    logs = "".join(p.read_text() for p in (sites.b.data / "views").rglob("*.log"))
    assert "fails its checksum" in logs and str(seg) in logs, logs
    sites.b.ferry("view-close", view["id"])

    # Restore: one line, no file left; the group shows the damage. Over the API the error
    # is a JournalCorrupt (HTTP 500 with its message).
    with pytest.raises(JournalCorrupt, match="group g1, disk g1-vda: journal segment"):
        sites.b.api("POST", "/v1/replicas/g1/restore",
                    {"disk": "g1-vda", "to": str(sites.work / "api.img")})
    assert not list(sites.work.glob("api.img*"))
    assert_refused(sites, "g1", "g1-vda", seg)
    st = replica_status(sites, "g1")
    assert st["state"] == "journal-damaged" and st["damage"][0]["found"] == "read"
    assert_refused(sites, "g1", "g1-vda", seg, "--checkpoint", new_id)
    restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", old_id)
    assert same_bytes(old_copy, restored)
    # Metrics and events say so too.
    m = samples(sites.b.api("GET", "/metrics"))
    assert m[("ferry_journal_damaged", (("group", "g1"),))] == 1
    assert m[("ferry_journal_damaged", (("group", "g2"),))] == 0
    def damaged_event() -> bool:  # the watcher samples status once a second or so
        events = [json.loads(line) for line in
                  sites.b.ferry("events", "--json").stdout.splitlines() if line.strip()]
        return any(e["kind"] == "journal" and e.get("change") == "damaged"
                   and e["group"] == "g1" for e in events)

    wait_for(damaged_event, 30, what="the journal-damaged event")

    # The other group replicates meanwhile and restores; the agent is up.
    sites.a.start()
    write(uri2, random.Random(7), big=True)
    synced(sites, "g2")
    assert replica_status(sites, "g2")["state"] == "receiving"
    restored = sites.restore("g2", "g2-vda")
    assert same_bytes(disk2, restored), first_difference(disk2, restored)
    assert sites.b.proc is not None and sites.b.proc.poll() is None
    # g1's damage (found by a read: its range is known) is repaired from the source.
    wait_for(lambda: replica_status(sites, "g1")["state"] == "receiving", 120,
             what="the repair of g1: %s" % replica_status(sites, "g1"))
    synced(sites, "g1")
    restored = sites.restore("g1", "g1-vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    restored, _ = restore(sites, "g1", "g1-vda", "--checkpoint", old_id)
    assert same_bytes(old_copy, restored)


# -- the open-time classifier (unit) --------------------------------------------------------

def rec(seq: int, n: int) -> bytes:
    r = JRecord(0, 1, seq, KIND_WRITE, 0, 4096 * seq, n, seq, bytes([seq]) * n)
    return encode_header(r) + (r.data or b"")


def classify(buf: bytes, acked: Optional[int]) -> damage.Classified:
    return damage.classify(buf, _holds, acked)


def test_classify_whole_records() -> None:
    buf = rec(1, 100) + rec(2, 10)
    got = classify(buf, len(buf))
    assert got.records == [(0, 148), (148, 206)] and got.damage == [] and got.cut is None


def test_classify_incomplete_final_record_is_a_torn_tail() -> None:
    buf = rec(1, 100) + rec(2, 100)[:70]
    for acked in (None, 148):
        got = classify(buf, acked)
        assert got.cut == 148 and got.damage == [] and got.missing == 0


def test_classify_failing_record_before_a_valid_one_is_damage() -> None:
    buf = bytearray(rec(1, 100) + rec(2, 100) + rec(3, 5))
    buf[148 + 60] ^= 1
    for acked in (None, 148, len(buf)):
        got = classify(bytes(buf), acked)
        assert got.damage == [(148, 296)] and got.cut is None
        assert got.records == [(0, 148), (296, 349)]


def test_classify_failing_final_record_inside_acked_is_damage() -> None:
    buf = bytearray(rec(1, 100) + rec(2, 100))
    buf[200] ^= 1
    assert classify(bytes(buf), None).cut == 148           # no mark: the structure decides
    assert classify(bytes(buf), 148).cut == 148             # past the acked end: torn
    got = classify(bytes(buf), 296)
    assert got.damage == [(148, 296)] and got.cut is None   # acked: damage
    torn = bytes(buf) + rec(3, 100)[:50]                    # and a tail after it
    got = classify(torn, 296)
    assert got.damage == [(148, 296)] and got.cut == 296


def test_classify_cut_into_acked_bytes_is_missing() -> None:
    buf = rec(1, 100) + rec(2, 100)
    got = classify(buf[:200], len(buf))
    assert got.damage == [(148, 200)] and got.missing == 96 and got.cut is None
    got = classify(buf[:148], len(buf))
    assert got.damage == [(148, 148)] and got.missing == 148


def test_classify_garbage_with_a_false_magic_inside() -> None:
    buf = rec(1, 100) + b"\0" * 10 + b"FJR\x01" + b"\xff" * 60 + rec(2, 20)
    got = classify(buf, len(buf))
    assert got.damage == [(148, 222)] and got.records[-1] == (222, 290)


@settings(deadline=None, max_examples=200)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=8), data=st.data())
def test_classify_keeps_every_other_record_and_cuts_only_past_acked(
        sizes: List[int], data: st.DataObject) -> None:
    parts = [rec(i + 1, n) for i, n in enumerate(sizes)]
    bounds = [0]
    for part in parts:
        bounds.append(bounds[-1] + len(part))
    buf = bytearray(b"".join(parts))
    acked_n = data.draw(st.integers(0, len(parts)), label="records acked")
    acked = bounds[acked_n] if data.draw(st.booleans(), label="mark") else None
    victim = data.draw(st.integers(0, len(parts) - 1), label="victim")
    buf[data.draw(st.integers(bounds[victim], bounds[victim + 1] - 1), label="byte")] ^= \
        data.draw(st.integers(1, 255), label="xor")
    got = classify(bytes(buf), acked)
    assert got.records == [(bounds[i], bounds[i + 1]) for i in range(len(parts)) if i != victim]
    start, end = bounds[victim], bounds[victim + 1]
    if victim < len(parts) - 1:
        assert got.damage == [(start, end)] and got.cut is None
    elif acked is None or start >= acked:
        assert got.damage == [] and got.cut == start  # never acked: a torn tail
    else:
        assert got.damage == [(start, end)] and got.cut is None


def test_header_range_only_when_it_fits_its_place() -> None:
    buf = bytearray(rec(1, 100) + rec(2, 100))
    buf[148 + 60] ^= 1   # the data: the header still says where and how long
    assert damage.header_range(memoryview(bytes(buf)), 148, 296) == (0, 8192, 100)
    assert damage.header_range(memoryview(bytes(buf)), 148, 250) is None
    buf[148] ^= 1        # the magic
    assert damage.header_range(memoryview(bytes(buf)), 148, 296) is None


def test_acked_mark_round_trip_and_a_damaged_mark_is_ignored(tmp_path: Path) -> None:
    mark = damage.AckedMark(str(tmp_path))
    assert mark.read() is None
    mark.write(3, 12345)
    assert mark.read() == (3, 12345)
    mark.close(sync=True)
    raw = bytearray((tmp_path / "acked").read_bytes())
    raw[6] ^= 1
    (tmp_path / "acked").write_bytes(bytes(raw))
    assert mark.read() is None


def test_damage_json_that_does_not_parse_names_the_file(tmp_path: Path) -> None:
    j = Journal(str(tmp_path))
    j.close()
    (tmp_path / "damage.json").write_text("{not json")
    with pytest.raises(JournalCorrupt, match=r"damage\.json does not hold"):
        Journal(str(tmp_path), group="g1")


def test_a_lost_acked_segment_is_damage(tmp_path: Path) -> None:
    j = Journal(str(tmp_path), segment_max=100)
    j.append([JRecord(0, 1, 1, KIND_WRITE, 0, 0, 80, 1, b"a" * 80)])
    j.append([JRecord(0, 1, 2, KIND_WRITE, 0, 0, 80, 2, b"b" * 80)])
    assert j.segments() == [1, 2]
    j.close()
    (tmp_path / ("seg-%016d.fjr" % 2)).unlink()
    j = Journal(str(tmp_path), segment_max=100, group="g1", disks=["vda"])
    assert [(d.segment, d.missing) for d in j.damage] == [(2, 128)]
    assert j.damage_from((1, 0)) is not None
    assert "128 acknowledged bytes missing" in j.describe(j.damage[0])
    j.close()


def test_live_failover_refuses_a_point_that_needs_damage(sites: Lab) -> None:
    disk, uri = protected(sites, "g1")
    (old_id, old_copy), _new = two_points(sites, "g1", disk, uri, 8)
    sites.a.stop()  # nothing repairs the damage meanwhile
    seg = segments(sites, "g1")[-1]
    flip_big_write(seg)  # B running, nobody has read it yet
    proc = sites.b.ferry("failover", "g1", "--live", check=False)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and len(err.splitlines()) == 1, err
    assert "group g1" in err and str(seg) in err, err
    st = replica_status(sites, "g1")
    assert st["failover"] is None and st["state"] == "journal-damaged"
    # An older point fails over; its live disk holds that point's bytes.
    sites.b.ferry("failover", "g1", "--live", "--checkpoint", old_id)
    st = replica_status(sites, "g1")
    assert st["failover"]["state"] == "done" and st["state"] == "failed-over"
    live = sites.b.data / "target" / "g1" / "live" / "g1-vda.img"
    assert same_bytes(old_copy, live), first_difference(old_copy, live)


# -- the view's reader (unit) ---------------------------------------------------------------

def reader_spec(tmp_path: Path) -> Tuple[Dict, Path]:
    j = Journal(str(tmp_path / "j"), group="g1", disks=["vda"])
    j.append([JRecord(0, 1, 1, KIND_WRITE, 0, 0, 4096, 1, b"a" * 4096),
              JRecord(0, 1, 2, KIND_WRITE, 0, 8192, 4096, 2, b"b" * 4096)])
    seg, size = Path(j.path(1)), j.end[1]
    j.close()
    replica = tmp_path / "vda.img"
    replica.write_bytes(bytes(16384))
    return {"group": "g1", "name": "vda", "disk": 0, "base": [0, 0], "upto": [1, 2],
            "start": [1, 0], "segments": [[1, str(seg), size]], "replica": str(replica),
            "size": 16384}, seg


def flip(path: Path, at: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        b = f.read(1)
        f.seek(at)
        f.write(bytes([b[0] ^ 1]))


def test_reader_checks_each_record_before_its_data(tmp_path: Path) -> None:
    from formats import jmap
    spec, seg = reader_spec(tmp_path)
    flip(seg, 4144 + 48 + 100)  # the second record's data
    r = jmap.open_reader(spec)
    assert r.verified
    assert r.pread(4096, 0) == b"a" * 4096
    with pytest.raises(jmap.RecordCorrupt) as e:
        r.pread(512, 8192 + 1024)
    assert e.value.errno == errno.EIO
    assert str(e.value) == ("group g1, disk vda: journal segment %s: the record at byte 4144 "
                            "fails its checksum" % seg)
    flip(seg, 4144 + 48 + 100)  # mended: a failing record is never remembered as good
    assert r.pread(4096, 8192) == b"b" * 4096
    r.close()


def test_reader_without_xxhash_refuses_known_damage_only(tmp_path: Path) -> None:
    from formats import jmap
    spec, seg = reader_spec(tmp_path)
    flip(seg, 4144 + 48 + 100)
    r = jmap.open_reader(spec, find=lambda path: None)
    assert not r.verified
    # The documented limit: without xxhash the plugin cannot check a checksum itself.
    assert r.pread(4096, 8192)[100:101] == bytes([ord("b") ^ 1])
    r.close()
    spec["damage"] = [[1, 4144, 4144 + 48 + 4096]]
    r = jmap.open_reader(spec, find=lambda path: None)
    with pytest.raises(jmap.RecordCorrupt, match="byte 4144 lies in damage site B found"):
        r.pread(4096, 8192)
    assert r.pread(4096, 0) == b"a" * 4096
    r.close()


def test_the_plugins_python_finds_the_agents_xxhash(tmp_path: Path) -> None:
    """nbdkit embeds the system Python, which may lack xxhash: the spec's path serves."""
    import subprocess
    import sys

    import xxhash

    from agent.target.group import _XXHASH_PATH
    system = shutil.which("python3")
    if system is None or Path(system).resolve() == Path(sys.executable).resolve():
        pytest.skip("no system Python apart from this one")
    code = ("import sys; sys.path.insert(0, %r); from formats import jmap; "
            "h = jmap.hasher(sys.argv[1] or None); "
            "print(h(b'ferry').intdigest() if h else 'none')" % str(Path(__file__).parents[1]))
    got = subprocess.run([system, "-c", code, _XXHASH_PATH], capture_output=True, text=True,
                         check=True).stdout.strip()
    assert got == str(xxhash.xxh3_64(b"ferry").intdigest())
    none = subprocess.run([system, "-c", code, "/nonexistent"], capture_output=True,
                          text=True, check=True).stdout.strip()
    native = subprocess.run([system, "-c", "import xxhash"], capture_output=True).returncode == 0
    assert none == (got if native else "none")
    # A module there that does not import (built for another Python) is not used.
    (tmp_path / "xxhash").mkdir()
    (tmp_path / "xxhash" / "__init__.py").write_text("raise ImportError('another Python')\n")
    other = subprocess.run([system, "-c", code, str(tmp_path)], capture_output=True,
                           text=True, check=True).stdout.strip()
    assert other == (got if native else "none")


# -- a target group with damage (real files, no agent) ------------------------------------

def test_group_table_has_the_damaged_state() -> None:
    from agent.errors import IllegalTransition
    from agent.target.group import LIFE, GroupEvent, GroupState
    assert LIFE.step(GroupState.RECEIVING, GroupEvent.DAMAGED) is GroupState.JOURNAL_DAMAGED
    assert LIFE.step(GroupState.JOURNAL_DAMAGED, GroupEvent.FAILOVER) is \
        GroupState.FAILED_OVER
    assert LIFE.step(GroupState.JOURNAL_DAMAGED, GroupEvent.CLOSE) is GroupState.CLOSED
    with pytest.raises(IllegalTransition):
        LIFE.step(GroupState.CLOSED, GroupEvent.DAMAGED)


def test_promotion_stops_before_damage_and_the_group_goes_on(tmp_path: Path) -> None:
    from agent.target.group import GroupState, TargetGroup
    from formats.records import FLAG_INCONSISTENT, FLAG_RESYNC, KIND_CONSISTENT

    def w(seq: int, offset: int, data: bytes) -> JRecord:
        return JRecord(0, 1, seq, KIND_WRITE, 0, offset, len(data), seq * 10, data)

    g = TargetGroup(str(tmp_path), "g", [("a", 64)], protection="p1", history_s=3600,
                    journal_max=10**9)
    first = JRecord(0, 1, 1, KIND_WRITE, FLAG_RESYNC | FLAG_INCONSISTENT, 0, 16, 10,
                    b"A" * 16)
    g.accept([first, JRecord(0, 1, 2, KIND_CONSISTENT, 0, 0, 0, 20, None)])
    for seq, offset, byte in ((3, 16, b"B"), (4, 32, b"C"), (5, 48, b"D")):
        g.accept([w(seq, offset, byte * 16)])
    seg = Path(g.journal.path(g.journal.segments()[-1]))
    pos = [p for p, kind, n in records(seg) if kind == KIND_WRITE][-2]  # seq 4
    g.close()
    flip(seg, pos + RECORD.size + 3)
    g2 = TargetGroup.reopen(str(tmp_path), "g")
    assert g2 is not None and g2.state is GroupState.JOURNAL_DAMAGED
    assert [(d["offset"], d["disk"], d["disk_offset"]) for d in g2.status()["damage"]] == \
        [(pos, "a", 32)]
    g2.set_limits(0, 0)  # no history kept: everything goes to the replica, up to the damage
    g2.maintain()
    assert Path(g2.replica_path("a")).read_bytes() == b"A" * 16 + b"B" * 16 + bytes(32)
    assert g2.status()["disks"]["a"]["applied_seq"] == 3
    assert g2.accept([w(6, 0, b"E" * 16)])[0] == 1  # new writes are still journaled
    assert g2.status()["disks"]["a"]["durable_seq"] == 6
    g2.maintain()
    assert g2.status()["disks"]["a"]["applied_seq"] == 3
    g2.close()


def test_promotion_reaching_damage_stops_there_and_the_agent_goes_on(sites: Lab) -> None:
    # History 10 s: segments close after 1.25 s and are promoted 10 s after their last append.
    _disk, uri = protected(sites, "g1", "--history", "10s")
    disk2, uri2 = protected(sites, "g2")
    rng = random.Random(9)
    write(uri, rng, big=True)
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "120")
    seg = segments(sites, "g1")[-1]
    flip_big_write(seg)  # before the promoter reaches it
    deadline = time.monotonic() + 120
    while True:  # later batches close the segment; the promoter gets to it
        write(uri, rng)
        st = replica_status(sites, "g1")
        if st["damage"] or not seg.exists():  # found (and maybe repaired and passed)
            break
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert "journal segment %s: 1048624 damaged bytes" % seg in sites.b.log.read_text()
    assert sites.b.proc is not None and sites.b.proc.poll() is None, "site B's agent died"
    # The damaged group still takes writes; the other one replicates and restores.
    write(uri, rng)
    synced(sites, "g1")
    write(uri2, rng, big=True)
    synced(sites, "g2")
    restored = sites.restore("g2", "g2-vda")
    assert same_bytes(disk2, restored), first_difference(disk2, restored)
    # Repaired from the source (automatically), promotion passes the damage: its segment
    # is applied and deleted, and the replica converges.
    wait_for(lambda: not seg.exists(), 120, what="promotion past the repaired damage: %s"
             % replica_status(sites, "g1"))
    synced(sites, "g1")
    restored = sites.restore("g1", "g1-vda")
    assert same_bytes(_disk, restored), first_difference(_disk, restored)
    assert "the points that need it are refused" in sites.b.log.read_text()
    assert sites.b.proc.poll() is None


def test_a_mark_that_cannot_be_written_stays_older(tmp_path: Path) -> None:
    (tmp_path / "acked").mkdir()  # opening it for writing fails (EISDIR)
    mark = damage.AckedMark(str(tmp_path))
    mark.write(1, 100)
    assert mark.failed == 1 and mark.read() is None
    mark.close(sync=True)


def test_damage_that_cannot_be_saved_is_still_refused(tmp_path: Path, caplog) -> None:
    j = Journal(str(tmp_path), group="g1", disks=["vda"])
    j.append([JRecord(0, 1, 1, KIND_WRITE, 0, 0, 100, 1, b"a" * 100)])
    flip(Path(j.path(1)), 100)
    (tmp_path / "damage.json").mkdir()  # a directory there: write_atomic's rename fails
    with pytest.raises(JournalCorrupt, match="byte 0"):
        j.read_at(1, 0)
    assert [d.offset for d in j.damage] == [0]
    assert "damage.json cannot be written" in caplog.text
    j.close()


def test_a_damaged_checkpoint_marker_loses_that_checkpoint_only(tmp_path: Path) -> None:
    from agent.checkpoints import Checkpoint
    from agent.target.group import GroupState, TargetGroup
    from formats.records import FLAG_INCONSISTENT, FLAG_RESYNC, KIND_CHECKPOINT, KIND_CONSISTENT

    def w(seq: int, offset: int, data: bytes) -> JRecord:
        return JRecord(0, 1, seq, KIND_WRITE, 0, offset, len(data), seq * 10, data)

    g = TargetGroup(str(tmp_path), "g", [("a", 64)], protection="p1", history_s=3600,
                    journal_max=10**9, segment_max=200)
    g.accept([JRecord(0, 1, 1, KIND_WRITE, FLAG_RESYNC | FLAG_INCONSISTENT, 0, 16, 10,
                      b"A" * 16), JRecord(0, 1, 2, KIND_CONSISTENT, 0, 0, 0, 20, None)])
    g.accept([w(3, 16, b"B" * 16)], [Checkpoint("c1", 30, "user", "one", [(1, 3)])])
    g.accept([w(4, 32, b"C" * 16)], [Checkpoint("c2", 40, "user", "two", [(1, 4)])])
    g.accept([w(5, 48, b"D" * 16)])
    marker = next((Path(g.journal.path(s)), p) for s in g.journal.segments()
              for p, kind, _n in records(Path(g.journal.path(s))) if kind == KIND_CHECKPOINT)
    assert marker[0] != Path(g.journal.path(g.journal.segments()[-1]))  # a closed segment
    g.close()
    flip(marker[0], marker[1] + RECORD.size + 5)
    g2 = TargetGroup.reopen(str(tmp_path), "g")
    # A marker holds no disk data: nothing to resend, it is repaired as found, only its
    # checkpoint is lost; the next one (its own marker whole) restores.
    assert g2 is not None and g2.state is GroupState.RECEIVING
    assert [c.id for c in g2.checkpoints] == ["c2"]
    assert [(d["offset"], d["disk"], d["disk_offset"], d["repaired_points"])
            for d in g2.status()["damage"]] == [(marker[1], None, None, [])]
    assert g2.asks() == []
    g2.restore("a", str(tmp_path / "two.img"), "two")
    assert (tmp_path / "two.img").read_bytes() == b"A" * 16 + b"B" * 16 + b"C" * 16 + \
        bytes(16)
    g2.close()
