"""Reads of site B's files that fail say where (``formats/reads.py``), and the view's reader
(``formats/jmap.py``) hands out nothing it could not read: a segment cut short under an open
reader is an error naming the segment and the byte (it was a SIGBUS when segments were
mapped). The real device errors: ``tests/test_target_read_eio.py``."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from test_integrity import reader_spec

from formats import jmap, reads


def test_a_failed_pread_names_the_file_and_the_range(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 100)
    fd = os.open(path, os.O_WRONLY)  # reading a write-only descriptor: EBADF
    try:
        with pytest.raises(OSError) as e:
            reads.pread(fd, 10, 20, str(path))
    finally:
        os.close(fd)
    assert e.value.errno == errno.EBADF and e.value.filename == str(path)
    assert reads.one_line(e.value).endswith(": Bad file descriptor reading 10 bytes at byte 20")
    assert reads.named(e.value, "other") is e.value  # named already
    bare = reads.failed(OSError(errno.EIO, "Input/output error"), 4096, 512)
    assert reads.one_line(bare) == "Input/output error reading 512 bytes at byte 4096"
    assert reads.one_line(reads.named(bare, "p")) == "p: " + reads.one_line(bare)


def test_a_segment_cut_short_under_a_reader_is_an_error_not_bytes(tmp_path: Path) -> None:
    spec, seg = reader_spec(tmp_path)
    r = jmap.open_reader(spec)
    assert r.pread(4096, 0) == b"a" * 4096
    os.truncate(seg, 4144 + 48 + 10)  # the second record's data is gone
    with pytest.raises(jmap.ReadFailed) as e:
        r.pread(4096, 8192)
    assert e.value.errno == errno.EIO and e.value.filename == str(seg)
    assert str(e.value) == ("group g1, disk vda: %s: the file ended early reading 4144 bytes "
                            "at byte 4144" % seg)
    r.close()


def test_a_record_longer_than_the_first_read_is_read_whole_and_checked(tmp_path: Path) -> None:
    from agent.target.journal import Journal, JRecord
    from formats.records import KIND_WRITE
    big = os.urandom(jmap.SPECULATE + 8192)
    j = Journal(str(tmp_path / "j"), group="g1", disks=["vda"])
    j.append([JRecord(0, 1, 1, KIND_WRITE, 0, 0, len(big), 1, big)])
    seg, size = Path(j.path(1)), j.end[1]
    j.close()
    replica = tmp_path / "vda.img"
    replica.write_bytes(bytes(len(big) + 4096))
    spec = {"group": "g1", "name": "vda", "disk": 0, "base": [0, 0], "upto": [1, 1],
            "start": [1, 0], "segments": [[1, str(seg), size]], "replica": str(replica),
            "size": len(big) + 4096}
    r = jmap.open_reader(spec)
    assert r.pread(len(big), 0) == big  # checked with the part past the first read
    assert r.pread(4096, len(big)) == bytes(4096)
    r.close()
    with open(seg, "r+b") as f:  # a flipped byte past the first read fails the check
        f.seek(size - 10)
        b = f.read(1)
        f.seek(size - 10)
        f.write(bytes([b[0] ^ 1]))
    r = jmap.open_reader(spec)
    with pytest.raises(jmap.RecordCorrupt, match="fails its checksum"):
        r.pread(4096, 0)
    r.close()
