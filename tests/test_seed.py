"""agent/seed.py and agent/target/seeds.py: pre-seeded sync. The digest maps of both sides,
adopting a seed file, the SEEDED record on the wire and in site B's group, and the
in-process target refusing bad seeds and bad SEEDED records."""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import pytest
import trio
import xxhash

from agent import seed
from agent.disks import Policy
from agent.protocol import batch, frames, messages
from agent.protocol.frames import ProtocolError
from agent.protocol.session import SourceSession
from agent.protocol.stream import SessionStream
from agent.source import seeds as source_seeds
from agent.target import seeds, server
from agent.target.group import TargetGroup
from formats.localwire import (
    FLAG_INCONSISTENT,
    FLAG_RESYNC,
    KIND_CONSISTENT,
    KIND_FLUSH,
    KIND_TRIM,
    KIND_WRITE,
    KIND_ZERO,
    Record,
)
from formats.records import KIND_SEEDED, JRecord
from nbd_plugin import link

C = 4096  # a small chunk keeps these tests fast; the logic does not care
RS = FLAG_RESYNC | FLAG_INCONSISTENT


def rec(seq: int, kind: int, offset: int, length: int, data: Optional[bytes] = None,
        flags: int = RS, gen: int = 1) -> Record:
    return Record(seq, seq * 10, offset, length, gen, kind, flags, data)


def content(size: int, rng: random.Random) -> bytearray:
    return bytearray(rng.randbytes(size))


def seed_list(m: seeds.SeedMap) -> source_seeds.SeedList:
    lst = source_seeds.SeedList(m.size, m.chunk)
    for first, digests, touched in m.frames():
        lst.add(first, digests, touched)
    return lst


def test_the_seed_chunk_is_the_splitters_resync_piece() -> None:
    """A resync record covers whole chunks only if its piece is a multiple of the chunk."""
    assert link.RESYNC_CHUNK % seed.CHUNK == 0


# -- site B's map ---------------------------------------------------------------------------

def test_a_seeded_range_must_be_whole_untouched_chunks_that_match() -> None:
    rng = random.Random(1)
    data = content(10 * C + 100, rng)  # the last chunk is short
    m = seeds.SeedMap(len(data), seed.digests_of(bytes(data), C), C)
    digest = seed.range_digest(seed.digests_of(bytes(data[C:3 * C]), C))
    assert m.check(C, 2 * C, digest) is None
    assert "whole" in str(m.check(C + 1, 2 * C, digest))
    assert "whole" in str(m.check(C, 2 * C - 1, digest))
    assert "whole" in str(m.check(C, 0, digest))
    assert "match" in str(m.check(C, 2 * C, bytes(16)))
    tail = seed.range_digest(seed.digests_of(bytes(data[10 * C:]), C))
    assert m.check(10 * C, 100, tail) is None
    assert "whole" in str(m.check(10 * C, 200, tail))  # past the end
    m.touch(KIND_WRITE, 2 * C + 5, 1)
    assert m.changed and m.untouched() == 10
    assert "changed" in str(m.check(C, 2 * C, digest))
    assert m.check(C, C, seed.range_digest(seed.digests_of(bytes(data[C:2 * C]), C))) is None


@pytest.mark.parametrize("kind", [KIND_WRITE, KIND_ZERO, KIND_TRIM])
def test_changes_touch_every_chunk_they_overlap(kind: int) -> None:
    m = seeds.SeedMap(8 * C, bytes(8 * seed.DIGEST), C)
    m.touch(kind, C - 1, C + 2)  # the ends of chunks 0 and 2
    assert list(m.touched) == [1, 1, 1, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("kind", [KIND_FLUSH, KIND_CONSISTENT, KIND_SEEDED])
def test_records_that_change_nothing_touch_nothing(kind: int) -> None:
    m = seeds.SeedMap(8 * C, bytes(8 * seed.DIGEST), C)
    m.touch(kind, 0, 8 * C if kind == KIND_SEEDED else 0)
    m.touch(KIND_WRITE, C, 0)
    assert m.untouched() == 8 and not m.changed


def test_a_copy_of_the_map_is_independent() -> None:
    m = seeds.SeedMap(4 * C, bytes(4 * seed.DIGEST), C)
    c = m.copy()
    c.touch(KIND_WRITE, 0, 1)
    assert m.untouched() == 4 and c.untouched() == 3


def test_frames_split_the_digests_and_carry_the_touched_map(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(seeds, "FRAME_CHUNKS", 3)
    digests = b"".join(bytes([i]) * seed.DIGEST for i in range(7))
    m = seeds.SeedMap(7 * C, digests, C)
    m.touch(KIND_ZERO, 4 * C, 1)
    frames = list(m.frames())
    assert [f[0] for f in frames] == [0, 3, 6]
    assert b"".join(f[1] for f in frames) == digests
    assert b"".join(f[2] for f in frames) == bytes([0, 0, 0, 0, 1, 0, 0])


def test_seed_files_round_trip_and_damage_drops_them(tmp_path: Path) -> None:
    m = seeds.SeedMap(5 * C, os.urandom(5 * seed.DIGEST), C)
    seeds.save_digests(str(tmp_path), "vda", m)
    m.touch(KIND_WRITE, 3 * C, 1)
    seeds.save_touched(str(tmp_path), "vda", m)
    back = seeds.load(str(tmp_path), "vda", 5 * C)
    assert back is not None and back.digests == m.digests and back.touched == m.touched
    assert back.chunk == C and not m.changed
    assert seeds.load(str(tmp_path), "vda", 6 * C) is None  # another size
    assert seeds.load(str(tmp_path), "vdb", 5 * C) is None  # none
    dpath, tpath = seeds.seed_paths(str(tmp_path), "vda")
    for path in (dpath, tpath):
        good = Path(path).read_bytes()
        Path(path).write_bytes(good[:3] + bytes([good[3] ^ 1]) + good[4:])
        assert seeds.load(str(tmp_path), "vda", 5 * C) is None
        Path(path).write_bytes(good)
    Path(dpath).write_bytes(b"short")
    assert seeds.load(str(tmp_path), "vda", 5 * C) is None
    seeds.drop(str(tmp_path), "vda")
    seeds.drop(str(tmp_path), "vda")  # nothing left: no error
    assert not os.path.exists(dpath) and not os.path.exists(tpath)


# -- site A's list --------------------------------------------------------------------------

def test_a_resync_of_matching_chunks_becomes_a_seeded_record() -> None:
    rng = random.Random(2)
    data = content(8 * C, rng)
    m = seeds.SeedMap(len(data), seed.digests_of(bytes(data), C), C)
    lists: List[Optional[source_seeds.SeedList]] = [seed_list(m)]
    items = [(0, rec(1, KIND_WRITE, 0, C, bytes(data[:C]))),
             (0, rec(2, KIND_WRITE, C, 2 * C, bytes(data[C:3 * C])))]
    out = source_seeds.substitute(lists, items)
    assert [r.kind for _d, r in out] == [KIND_SEEDED, KIND_SEEDED]
    assert [(r.seq, r.offset, r.length, r.flags) for _d, r in out] == [
        (1, 0, C, RS), (2, C, 2 * C, RS)]
    for _d, r in out:
        assert m.check(r.offset, r.length, r.data) is None  # site B agrees


def test_what_differs_or_is_not_a_resync_of_whole_chunks_ships() -> None:
    rng = random.Random(3)
    data = content(8 * C, rng)
    m = seeds.SeedMap(len(data), seed.digests_of(bytes(data), C), C)
    lst = seed_list(m)
    other = bytes(data[:C - 1]) + b"\0"
    assert lst.substitute(KIND_WRITE, RS, 0, C, other) is None  # differs
    assert lst.substitute(KIND_WRITE, RS, 0, C, bytes(data[:C])) is None  # now touched
    assert lst.substitute(KIND_WRITE, 0, C, C, bytes(data[C:2 * C])) is None  # a guest write
    assert lst.substitute(KIND_WRITE, RS, C, C, bytes(data[C:2 * C])) is None
    assert lst.substitute(KIND_WRITE, RS, 2 * C + 1, C, bytes(C)) is None  # not aligned
    assert lst.substitute(KIND_WRITE, RS, 4 * C, C // 2, bytes(data[4 * C:4 * C + C // 2])) \
        is None  # part of a chunk
    assert lst.substitute(KIND_WRITE, RS, 4 * C, C, bytes(data[4 * C:5 * C])) is None
    assert lst.substitute(KIND_ZERO, RS, 5 * C, 2 * C, None) is None
    assert lst.substitute(KIND_WRITE, RS, 5 * C, C, bytes(data[5 * C:6 * C])) is None
    # Two chunks in one record, one of them differs: the whole record ships.
    mixed = bytes(data[6 * C:7 * C]) + bytes(C)
    assert lst.substitute(KIND_WRITE, RS, 6 * C, 2 * C, mixed) is None
    assert list(lst.usable) == [0] * 8
    assert lst.substitute(KIND_FLUSH, 0, 0, 0, None) is None


def test_the_short_last_chunk_and_site_b_touched_chunks() -> None:
    rng = random.Random(4)
    data = content(3 * C + 10, rng)
    m = seeds.SeedMap(len(data), seed.digests_of(bytes(data), C), C)
    m.touch(KIND_TRIM, 0, 1)
    lst = seed_list(m)
    assert lst.substitute(KIND_WRITE, RS, 0, C, bytes(data[:C])) is None
    digest = lst.substitute(KIND_WRITE, RS, 3 * C, 10, bytes(data[3 * C:]))
    assert digest is not None and m.check(3 * C, 10, digest) is None


def test_a_disks_list_ends_at_its_consistent_record() -> None:
    rng = random.Random(5)
    data = content(4 * C, rng)
    m = seeds.SeedMap(len(data), seed.digests_of(bytes(data), C), C)
    lists: List[Optional[source_seeds.SeedList]] = [seed_list(m), None]
    items = [(1, rec(1, KIND_WRITE, 0, C, bytes(data[:C]))),  # disk 1 has no seed
             (0, rec(1, KIND_CONSISTENT, 0, 0, flags=0)),
             (0, rec(2, KIND_WRITE, 0, C, bytes(data[:C])))]
    out = source_seeds.substitute(lists, items)
    assert [r.kind for _d, r in out] == [KIND_WRITE, KIND_CONSISTENT, KIND_WRITE]
    assert lists == [None, None]


def test_seed_frames_are_checked() -> None:
    lists: List[Optional[source_seeds.SeedList]] = [None]
    good = {"group": "g", "disk": 0, "chunk": C, "first": 0, "digests": bytes(32),
            "touched": bytes(2)}
    ctx = messages.Context("g", 1)
    source_seeds.add_frame(messages.Seed.parse(good, ctx), lists, [2 * C])
    assert lists[0] is not None and list(lists[0].usable) == [1, 1]
    for bad in ({"disk": 1}, {"chunk": 0}, {"first": 1}, {"digests": bytes(31)},
                {"touched": 3}, {"chunk": seed.MAX_CHUNK * 2}, {"group": "h"}):
        with pytest.raises(ProtocolError):
            source_seeds.add_frame(messages.Seed.parse(dict(good, **bad), ctx), [None], [2 * C])


# -- adopting a seed file -------------------------------------------------------------------

def write_seed(path: Path, size: int, rng: random.Random) -> bytearray:
    """Data chunks, an all-zero chunk written out, and a hole; the tail is short."""
    data = bytearray(size)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 1 << 20):
            n = min(1 << 20, size - off)
            kind = (off >> 20) % 4
            if kind == 3:
                continue  # a hole
            chunk = bytes(n) if kind == 2 else rng.randbytes(n)
            f.seek(off)
            f.write(chunk)
            data[off:off + n] = chunk
    return data


def test_adopt_copies_keeps_holes_and_hashes_what_it_wrote(tmp_path: Path) -> None:
    size = 9 * (1 << 20) + 12345
    src = tmp_path / "seed.img"
    data = write_seed(src, size, random.Random(6))
    before = (src.stat().st_mtime_ns, xxhash.xxh3_64_intdigest(src.read_bytes()))
    dest = tmp_path / "replica.img"
    m = seeds.adopt(str(src), str(dest), size)
    assert dest.read_bytes() == data
    assert m.digests == seed.digests_of(bytes(data)) and m.untouched() == 10
    # Four of the nine whole chunks hold data: the zero chunk and the hole stay holes.
    assert dest.stat().st_blocks * 512 <= 6 * (1 << 20)
    assert not os.path.exists(str(dest) + ".seeding")
    assert (src.stat().st_mtime_ns, xxhash.xxh3_64_intdigest(src.read_bytes())) == before


def test_adopt_without_seek_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A block device whose kernel has no SEEK_DATA: read it all."""
    size = 3 * (1 << 20)
    src = tmp_path / "seed.img"
    data = write_seed(src, size, random.Random(7))
    real = os.lseek

    def lseek(fd: int, pos: int, how: int) -> int:
        if how == os.SEEK_DATA:
            raise OSError(22, "Invalid argument")
        return real(fd, pos, how)

    monkeypatch.setattr(os, "lseek", lseek)
    m = seeds.adopt(str(src), str(tmp_path / "r.img"), size)
    assert (tmp_path / "r.img").read_bytes() == data and m.digests == seed.digests_of(data)


@pytest.mark.parametrize("errno_", [18, 22, 38, 95])  # EXDEV EINVAL ENOSYS EOPNOTSUPP
def test_adopt_where_the_kernel_cannot_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            errno_: int) -> None:
    """copy_file_range across file systems (older kernels, some file systems), or from a
    block device: the copy falls back to reads and writes, after a partial copy too."""
    size = 3 * (1 << 20) + 5
    src = tmp_path / "seed.img"
    data = write_seed(src, size, random.Random(13))
    real = os.copy_file_range
    calls = []

    def copy_file_range(src_fd: int, dst_fd: int, count: int, offset_src: int,
                        offset_dst: int) -> int:
        calls.append(count)
        if len(calls) == 1:
            return real(src_fd, dst_fd, min(count, 4096), offset_src, offset_dst)
        raise OSError(errno_, os.strerror(errno_))

    monkeypatch.setattr(os, "copy_file_range", copy_file_range)
    m = seeds.adopt(str(src), str(tmp_path / "r.img"), size)
    assert (tmp_path / "r.img").read_bytes() == data and m.digests == seed.digests_of(data)
    assert len(calls) >= 2

    def broken(*args: int) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "copy_file_range", broken)
    with pytest.raises(OSError, match="Input/output"):
        seeds.adopt(str(src), str(tmp_path / "r2.img"), size)
    assert not (tmp_path / "r2.img.seeding").exists()


def test_adopt_by_reflink(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On XFS or btrfs FICLONE shares the seed's blocks: adopt copies nothing itself, and
    hashes what the clone holds. (Emulated: this machine's file system may have none.)"""
    size = 5 * (1 << 20) + 7
    src = tmp_path / "seed.img"
    data = write_seed(src, size, random.Random(12))
    calls = []

    def ioctl(fd: int, request: int, arg: int) -> int:
        assert request == seeds.FICLONE
        calls.append(fd)
        os.ftruncate(fd, size)
        os.pwrite(fd, os.pread(arg, size, 0), 0)
        return 0

    monkeypatch.setattr(seeds.fcntl, "ioctl", ioctl)
    monkeypatch.setattr(seeds, "pwrite_all", None)  # never called
    m = seeds.adopt(str(src), str(tmp_path / "r.img"), size)
    assert calls and (tmp_path / "r.img").read_bytes() == data
    assert m.digests == seed.digests_of(bytes(data))

    def broken(fd: int, request: int, arg: int) -> int:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(seeds.fcntl, "ioctl", broken)
    with pytest.raises(OSError, match="Input/output"):
        seeds.adopt(str(src), str(tmp_path / "r2.img"), size)
    assert not (tmp_path / "r2.img").exists() and not (tmp_path / "r2.img.seeding").exists()


def test_an_all_hole_seed(tmp_path: Path) -> None:
    src = tmp_path / "seed.img"
    with open(src, "wb") as f:
        f.truncate(2 * (1 << 20) + 1)
    m = seeds.adopt(str(src), str(tmp_path / "r.img"), 2 * (1 << 20) + 1)
    assert m.digests == seed.digests_of(bytes(2 * (1 << 20) + 1))


def test_seed_files_that_cannot_be_adopted(tmp_path: Path) -> None:
    src = tmp_path / "seed.img"
    src.write_bytes(bytes(100))
    for path, size, words in ((src, 200, "is 100 bytes; the disk is 200"),
                              (tmp_path / "nope.img", 100, "No such file"),
                              (tmp_path, 100, "neither a file"),
                              (Path("seed.img"), 100, "absolute")):
        with pytest.raises(seed.SeedError, match=words):
            seeds.check_file(str(path), size)
    with pytest.raises(seed.SeedError, match="is 100 bytes"):
        seeds.adopt(str(src), str(tmp_path / "r.img"), 200)
    assert not (tmp_path / "r.img").exists()
    os.chmod(src, 0)
    if os.geteuid() != 0:  # root reads anything
        with pytest.raises(seed.SeedError, match="Permission denied"):
            seeds.check_file(str(src), 100)


# -- the wire -------------------------------------------------------------------------------

def test_a_seeded_record_on_the_wire() -> None:
    digest = os.urandom(batch.SEEDED_DATA)
    r = rec(7, KIND_SEEDED, 1 << 20, 1 << 20, digest)
    w = rec(8, KIND_WRITE, 0, 3, b"abc", flags=0)
    body = batch.encode_batch("g", [(0, r), (0, w)], 1, 2)
    assert body["data"] == digest + b"abc"
    assert batch.decode_batch(body) == [
        JRecord(0, 1, 7, KIND_SEEDED, RS, 1 << 20, 1 << 20, 70, digest),
        JRecord(0, 1, 8, KIND_WRITE, 0, 0, 3, 80, b"abc")]
    body = batch.encode_batch("g", [(0, r)], 1, 2)
    body["data"] = digest[:-1]
    with pytest.raises(ProtocolError, match="shorter"):
        batch.decode_batch(body)
    assert frames.TYPE_NAMES[frames.T_SEED] == "SEED"


# -- site B's group -------------------------------------------------------------------------

SIZE = 8 * (1 << 20)
MiB = 1 << 20


def seeded_group(tmp_path: Path, rng: random.Random) -> Tuple[TargetGroup, bytearray, Path]:
    """A new group on site B, its disk ``a`` started from a seed file."""
    src = tmp_path / "seed.img"
    data = bytearray(rng.randbytes(SIZE))
    src.write_bytes(data)
    directory = tmp_path / "g"
    seeds.adopt_group(str(directory), "g", [("a", SIZE)], {"a": str(src)})
    return TargetGroup(str(directory), "g", [("a", SIZE)], protection="p"), data, src


def jr(seq: int, kind: int, offset: int, length: int, data: Optional[bytes] = None,
       flags: int = RS) -> JRecord:
    return JRecord(0, 1, seq, kind, flags, offset, length, seq, data)


def seeded(seq: int, data: bytes, offset: int, length: int) -> JRecord:
    return jr(seq, KIND_SEEDED, offset, length,
              seed.range_digest(seed.digests_of(bytes(data[offset:offset + length]))))


def test_site_b_journals_seeded_records_and_ends_identical(tmp_path: Path) -> None:
    rng = random.Random(8)
    g, data, _src = seeded_group(tmp_path, rng)
    assert g.status()["disks"]["a"]["seed_untouched_chunks"] == 8
    disk = bytearray(data)
    new = rng.randbytes(MiB)
    disk[2 * MiB:3 * MiB] = new
    fresh, _ids = g.accept([seeded(1, data, 0, 2 * MiB), jr(2, KIND_WRITE, 2 * MiB, MiB, new),
                            jr(3, KIND_WRITE, 5 * MiB + 7, 3, b"xyz", flags=FLAG_INCONSISTENT)])
    disk[5 * MiB + 7:5 * MiB + 10] = b"xyz"
    assert fresh == 3
    g.accept([seeded(4, data, 3 * MiB, 2 * MiB), jr(5, KIND_WRITE, 5 * MiB, MiB,
                                                    bytes(disk[5 * MiB:6 * MiB])),
              seeded(6, data, 6 * MiB, 2 * MiB)])
    assert g.status()["disks"]["a"]["seed_untouched_chunks"] == 6
    _durable, frames = g.seed_frames()
    assert [f[4] for f in frames] == [bytes([0, 0, 1, 0, 0, 1, 0, 0])]
    g.accept([jr(7, KIND_CONSISTENT, 0, 0, flags=0)])
    assert g.seeds == [None] and g.seed_frames()[1] == []
    assert not os.path.exists(seeds.seed_paths(g.directory, "a")[0])
    dest = tmp_path / "restored.img"
    g.restore("a", str(dest))
    assert dest.read_bytes() == disk
    g.close()


def test_site_b_refuses_seeded_records_it_cannot_vouch_for(tmp_path: Path) -> None:
    rng = random.Random(9)
    g, data, _src = seeded_group(tmp_path, rng)
    g.accept([jr(1, KIND_ZERO, MiB, 10)])
    journal = g.journal.size()
    bad = [
        ([seeded(2, data, MiB, MiB)], "changed since the seed"),
        ([jr(2, KIND_TRIM, 0, 1), seeded(3, data, 0, MiB)], "changed since the seed"),
        ([jr(2, KIND_SEEDED, 0, MiB, bytes(16))], "does not match"),
        ([seeded(2, data, 0, MiB - 1)], "whole"),
        ([jr(2, KIND_CONSISTENT, 0, 0, flags=0), seeded(3, data, 0, MiB)], "no seed"),
    ]
    for records, words in bad:
        with pytest.raises(ProtocolError, match=words):
            g.accept(records)
        assert g.journal.size() == journal  # nothing of the batch was written
    g.accept([seeded(2, data, 0, MiB)])  # the same chunk is fine on its own
    g.close()


def test_site_b_keeps_the_touched_map_across_a_restart(tmp_path: Path) -> None:
    rng = random.Random(10)
    g, data, _src = seeded_group(tmp_path, rng)
    g.accept([jr(1, KIND_WRITE, 0, 4, b"abcd")])
    g.checkpoint()  # saves the map, as promotion does every 256 MiB
    g.accept([jr(2, KIND_WRITE, 3 * MiB, 4, b"abcd")])  # journaled, map not saved yet
    g.journal.close()  # a crash: no checkpoint on the way out
    for fd in g.fds:
        os.close(fd)
    g2 = TargetGroup(g.directory, "g", [("a", SIZE)], protection="p")
    assert list(g2.seeds[0].touched) == [1, 0, 0, 1, 0, 0, 0, 0]  # type: ignore[union-attr]
    with pytest.raises(ProtocolError, match="changed"):
        g2.accept([seeded(3, data, 3 * MiB, MiB)])
    g2.accept([seeded(3, data, 4 * MiB, MiB)])
    g2.close()


def test_a_new_protection_drops_the_seed(tmp_path: Path) -> None:
    g, _data, _src = seeded_group(tmp_path, random.Random(11))
    g.close()
    g2 = TargetGroup(g.directory, "g", [("a", SIZE)], protection="another")
    assert g2.seeds == [None] and not os.path.exists(os.path.join(g.directory, "seeds"))
    g2.close()


# -- the target agent, in process -----------------------------------------------------------

async def session(site: server.TargetSite, port: int, open_body: Dict
                  ) -> Tuple[SessionStream, messages.Opened]:
    """A source's session with ``site``, its OPEN made of ``open_body`` as it is (so that
    values a real source never sends go too)."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    fs = SessionStream(stream, "B", SourceSession())
    await fs.send(messages.Hello("a" * 32))
    await fs.expect(messages.Welcome)
    await fs.send(messages.Open(open_body["group"], open_body["protection"],
                                tuple((d["name"], d["size"]) for d in open_body["disks"]),
                                bool(open_body.get("probe")), None, open_body.get("seeds")))
    return fs, await fs.expect(messages.Opened)


async def test_the_target_refuses_bad_seeds_and_sends_good_ones(tmp_path: Path) -> None:
    site = server.TargetSite(str(tmp_path / "data"), "B",
                             policy=Policy(str(tmp_path / "data"), [str(tmp_path)]))
    src = tmp_path / "seed.img"
    data = os.urandom(2 * MiB)
    src.write_bytes(data)
    body = {"group": "g", "protection": "p", "disks": [{"name": "a", "size": 2 * MiB}],
            "probe": True, "seeds": {"a": str(src)}}
    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(site.serve, "127.0.0.1", 0)
        port = listeners[0].socket.getsockname()[1]
        for seeds, words, code in (
                ({"b": str(src)}, "does not have", frames.E_BAD_SEED),
                ({"a": str(tmp_path / "nope")}, "No such file", frames.E_BAD_SEED),
                ({"a": "relative.img"}, "absolute", frames.E_BAD_SEED),
                ({"a": 7}, "bad seed path", frames.E_PROTOCOL)):
            for probe in (True, False):
                with pytest.raises(frames.RemoteError, match=words) as e:
                    await session(site, port, dict(body, seeds=seeds, probe=probe))
                assert e.value.code == code
        assert os.listdir(site.root) == []  # nothing was made
        site.broken["h"] = "KeyError: 'size'"  # a group site B holds but could not open
        with pytest.raises(frames.RemoteError, match="cannot open it: KeyError") as e:
            await session(site, port, dict(body, group="h"))
        assert e.value.code == frames.E_BAD_SEED
        fs, opened = await session(site, port, body)  # the probe: fine, nothing made
        await fs.aclose()
        assert opened.seed_frames == 0 and os.listdir(site.root) == []
        fs, opened = await session(site, port, dict(body, probe=False))
        assert opened.seed_frames == 1
        frame = await fs.expect(messages.Seed)
        assert frame.digests == seed.digests_of(data) and frame.touched == bytes(2)
        assert (Path(site.root) / "g" / "replicas" / "a.img").read_bytes() == data
        # A SEEDED record for a chunk that differs: the batch is refused, nothing written.
        await fs.send(messages.Batch("g", [(0, rec(1, KIND_SEEDED, 0, MiB, bytes(16)))], 1, 2))
        with pytest.raises(frames.RemoteError, match="does not match") as e:
            await fs.receive()
        assert e.value.code == frames.E_PROTOCOL
        await fs.aclose()
        assert site.groups["g"].durable() == [(0, 0)]
        # The group exists now: a seed for it is refused, a session without one is not.
        for probe in (True, False):
            with pytest.raises(frames.RemoteError, match="already holds") as e:
                await session(site, port, dict(body, protection="q", probe=probe))
            assert e.value.code == frames.E_BAD_SEED
        fs, opened = await session(site, port, dict(body, probe=False))  # same protection
        assert opened.seed_frames == 1
        await fs.expect(messages.Seed)
        digest = seed.range_digest(seed.digests_of(data[MiB:]))
        await fs.send(messages.Batch("g", [(0, rec(1, KIND_SEEDED, MiB, MiB, digest))], 1, 2))
        assert (await fs.expect(messages.Ack)).durable == ((1, 1),)
        await fs.aclose()
        no_seeds = {k: v for k, v in body.items() if k != "seeds"}
        fs, opened = await session(site, port, dict(no_seeds, probe=False))
        assert opened.seed_frames == 0  # an older source: no SEED frames
        await fs.aclose()
        nursery.cancel_scope.cancel()
    site.close()
