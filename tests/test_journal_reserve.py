"""``protect --journal-reserve``: site B preallocates a group's journal up to --journal-max,
so that a file system filled from outside cannot stop the journal; a reserve the file
system cannot hold is refused with the numbers; a group without it keeps no reserve.

Site B's data directory is the small loop-mounted ext4 of tests/test_fill.py."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import nbd
import pytest
from conftest import Lab, first_difference, same_bytes
from test_faults import wait_for
from test_fill import fill, small_b  # noqa: F401  (the fixture)

from agent.protocol import frames, messages

MiB = 1024 * 1024
DISK = 8 * MiB
JOURNAL_MAX = 8 * MiB


def _random_disk(lab: Lab, name: str) -> Path:
    """A disk full of data, so that the replica's blocks are all allocated once synced."""
    path = lab.image(name, DISK)
    with open(path, "r+b") as f:
        f.write(os.urandom(DISK))
    return path


def test_a_reserved_journal_outlives_a_full_file_system(small_b: Lab) -> None:  # noqa: F811
    lab = small_b
    lab.b.start()
    lab.a.start()
    # Refused before anything: a reserve larger than the file system, with the numbers.
    big = lab.image("big.img", 4 * MiB)
    proc = lab.a.ferry("protect", "g2", "--disk", "big=%s" % big, "--target", lab.b.address,
                       "--journal-max", "1G", "--journal-reserve", check=False)
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, err
    assert "journal reserve for --journal-max 1073741824 needs" in err, err
    assert str(lab.b.data) in err and "are free" in err and len(err.strip().splitlines()) == 1
    assert not (lab.b.data / "target" / "g2").exists()
    assert "g2" not in lab.a.status()["groups"]

    # A group without the reserve: nothing preallocated, as before.
    plain = lab.image("plain.img", 1 * MiB)
    lab.protect("g0", plain)
    disk = _random_disk(lab, "vda.img")
    uris = lab.protect("g1", disk, extra=("--journal-max", "8M", "--journal-reserve"))
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    lab.a.ferry("wait", "g0", "--synced", "--timeout", "60")
    replicas = lab.b.status()["replicas"]
    assert replicas["g0"]["journal_reserve"] is None
    assert not [p for p in (lab.b.data / "target" / "g0" / "journal").iterdir()
                if p.suffix == ".fjs"]
    r = replicas["g1"]["journal_reserve"]
    assert r["bytes"] == 3 * JOURNAL_MAX + 2 * MiB and r["allocated"] >= r["bytes"], r
    shown = lab.b.ferry("status").stdout
    assert " in a reserve of " in shown and shown.count(" in a reserve of ") == 1, shown

    ballast = fill(lab.b.data)
    st = os.statvfs(lab.b.data)
    assert st.f_bavail * st.f_frsize < 1 * MiB
    # Five times the journal's limit through the splitter: segments fill their slots,
    # close, are applied and their slots taken again, with no free byte on the file system.
    h = nbd.NBD()
    h.connect_uri(uris["vda"])
    for n in range(40):
        block = os.urandom(1 * MiB)
        h.pwrite(block, (n * 3 % 8) * MiB)
        if n % 8 == 7:
            h.flush()
    h.flush()
    h.shutdown()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "90")
    g1 = lab.a.status("g1")["groups"]["g1"]
    assert g1["state"] == "replicating", g1
    after = lab.b.status()["replicas"]["g1"]
    assert after["journal_reserve"]["allocated"] >= r["bytes"] - 2 * MiB, after
    assert not after["damage"], after
    # The slots were taken in turn: more segments than slots, as many files as slots.
    names = [p.name for p in (lab.b.data / "target" / "g1" / "journal").iterdir()]
    segs = [n for n in names if n.endswith(".fjr")]
    assert max(int(n[4:20]) for n in segs) > r["slots"], names
    assert len(segs) + len([n for n in names if n.startswith("spare-")]) == r["slots"], names
    restored = lab.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)

    # Site B starts again on the full file system: the group opens with its reserve (what
    # it cannot take back is logged) and takes more writes.
    lab.b.stop()
    lab.b.start()
    h = nbd.NBD()
    h.connect_uri(uris["vda"])
    for n in range(12):
        h.pwrite(os.urandom(1 * MiB), (n * 5 % 8) * MiB)
    h.flush()
    h.shutdown()
    lab.a.ferry("wait", "g1", "--synced", "--timeout", "90")
    assert lab.b.status()["replicas"]["g1"]["journal_reserve"]["bytes"] == r["bytes"]
    restored = lab.restore("g1", "vda")
    assert same_bytes(disk, restored), first_difference(disk, restored)
    assert ballast.exists()  # nothing was freed on the file system meanwhile


def test_a_reserve_refused_when_the_session_opens(lab: Lab) -> None:
    """Protected while site B was down (no probe): the session is refused with the
    numbers (ERROR journal-reserve) and site A shows it; nothing is reserved."""
    lab.a.start()
    disk = lab.image("vdb.img", 1 * MiB)
    lab.a.ferry("protect", "g3", "--disk", "vdb=%s" % disk, "--target", lab.b.address,
                "--allow-unreachable", "--journal-max", "1000T", "--journal-reserve")
    lab.b.start()

    def refused() -> bool:
        g = lab.a.status("g3")["groups"]["g3"]
        return g["state"] == "target-error" and "journal-reserve: " in (g["error"] or "")

    wait_for(refused, timeout=60, what="site A to show the refused reserve")
    err = lab.a.status("g3")["groups"]["g3"]["error"]
    assert "the journal reserve for --journal-max %d needs" % (1000 << 40) in err, err
    journal = lab.b.data / "target" / "g3" / "journal"
    assert not [p for p in journal.iterdir() if p.suffix == ".fjs"]


def test_journal_reserve_on_the_wire() -> None:
    ctx = messages.Context()
    base = {"group": "g", "protection": "p" * 32, "disks": [{"name": "d", "size": 4096}]}
    limits = {"history_s": 60, "journal_max": 1 << 20}
    assert "journal_reserve" not in messages.Open("g", "p", (("d", 4096),)).body()
    sent = messages.Open("g", "p", (("d", 4096),), limits=(60, 1 << 20), reserve=True)
    assert sent.body()["journal_reserve"] is True
    assert messages.Open.parse(dict(base, **limits, journal_reserve=True), ctx).reserve
    assert not messages.Open.parse(dict(base, **limits), ctx).reserve
    with pytest.raises(frames.ProtocolError, match="journal_reserve without journal_max"):
        messages.Open.parse(dict(base, journal_reserve=True), ctx)
    with pytest.raises(frames.ProtocolError, match="wrong type"):
        messages.Open.parse(dict(base, **limits, journal_reserve=1), ctx)


def _records(n: int, seq: int) -> list:
    from formats.records import KIND_WRITE, JRecord
    return [JRecord(0, 1, seq + i, KIND_WRITE, 0, 0, MiB, 0, b"\x5a" * MiB) for i in range(n)]


def test_reserve_slots_on_a_full_file_system(small_b: Lab, caplog) -> None:  # noqa: F811
    """In one process, on the small file system: the journal in its slots while nothing
    else is free; past its slots it logs, and an append that finds no space fails as
    before; a slot another writer took is
    logged, not raised; the room gives back what a small file needs."""
    data = small_b.b.data
    journals: list = []
    try:
        _slots(data, caplog, journals)
    finally:
        for j in journals:
            j.close()


def _slots(data: Path, caplog, journals: list) -> None:
    from agent.target import reserve
    from agent.target.journal import Journal

    j = Journal(str(data / "journal"), group="g")
    journals.append(j)
    r = reserve.Reserve("g", j.directory, JOURNAL_MAX)
    j.set_reserve(r)
    assert (r.slot, r.slots) == (8 * MiB, 3)
    assert reserve.allocated(j.directory) >= r.size
    plain = os.path.join(j.directory, "extra")  # recycled below, as if a segment
    with open(plain, "wb") as f:
        f.write(b"y" * 4096)
    ballast = fill(data)
    seq = 1
    for _ in range(4):  # 4 MiB batches: a segment a slot, applied and recycled in turn
        j.append(_records(4, seq))
        seq += 4
        j.drop_before(j.segments()[-1])
    assert j.segments()[-1] == 4 and reserve.allocated(j.directory) >= r.size - reserve.ROOM
    # The room: a small file that finds no space gets it from the room; another error is
    # raised as it is.
    small = data / "small"
    r.room_for(lambda: small.write_bytes(b"x" * 200 * 1024), 256 * 1024)
    assert small.stat().st_size == 200 * 1024
    with pytest.raises(FileNotFoundError):
        r.room_for(lambda: (data / "none" / "x").write_bytes(b""), 4096)
    # Past the slots (the promoter held back): the segment is made, what it cannot
    # allocate logged, and an append that finds no space fails as it always did.
    caplog.set_level("WARNING")
    with pytest.raises(OSError) as failed:
        for _ in range(6):
            j.append(_records(4, seq))
            seq += 4
    assert failed.value.errno == errno.ENOSPC
    assert "cannot be allocated" in caplog.text
    assert len(j.segments()) == r.slots + 1  # every slot held records first
    # A new reserve cannot be taken: refused with the numbers, nothing allocated.
    with pytest.raises(reserve.ReserveError, match=r"needs \d+ more bytes on the file system"):
        reserve.check("h", str(data / "other"), JOURNAL_MAX)
    # A recycled slot whose blocks another writer took: logged, the segment still goes.
    caplog.clear()
    small.unlink()
    fill(data)  # takes what the room gave back too
    r.recycle(plain)
    assert "cannot be allocated" in caplog.text and not os.path.exists(plain)
    # An agent opening the journal again on the full file system keeps it, logs the rest.
    journals.remove(j)
    j.close()
    caplog.clear()
    j2 = Journal(str(data / "journal"), group="g")
    journals.append(j2)
    j2.set_reserve(reserve.Reserve("g", j2.directory, 2 * JOURNAL_MAX), strict=False)
    assert j2.reserve is not None and "cannot be allocated" in caplog.text
    ballast.unlink()


def test_reserve_after_a_crash_and_a_new_limit(tmp_path: Path) -> None:
    """A crash inside ``take`` (a spare that is a segment too) leaves the segment whole; a
    crash between a rename and the recycle leaves an empty spare; a new limit resizes the
    spares."""
    from agent.target import reserve
    from agent.target.journal import Journal

    directory = str(tmp_path / "journal")
    j = Journal(directory, group="g")
    j.set_reserve(reserve.Reserve("g", directory, JOURNAL_MAX))
    j.append(_records(1, 1))
    size = j.segment_size(1)
    j.close()
    os.link(j.path(1), os.path.join(directory, "spare-%016d.fjs" % 90))
    with open(os.path.join(directory, "spare-%016d.fjs" % 91), "wb") as f:
        f.write(b"old records")
    j = Journal(directory, group="g")
    try:
        r = reserve.Reserve("g", directory, 36 * MiB)
        j.set_reserve(r)
        assert r.slot == 9 * MiB and r.slots == 6
        assert os.stat(j.path(1)).st_size == size and os.stat(j.path(1)).st_nlink == 1
        assert j.read_at(1, 0).seq == 1
        spares = [p for p in Path(directory).iterdir() if p.name.startswith("spare-")]
        assert len(spares) == r.slots - 1, spares
        for p in spares:
            st = p.stat()
            assert st.st_size == 0 and st.st_blocks * 512 >= r.slot, (p, st)
    finally:
        j.close()
