"""formats/durable.py on real files: atomic replacement, and new files that cannot be
redirected by a link planted at their name."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from formats import durable


def test_write_atomic_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    p = tmp_path / "meta.json"
    durable.write_atomic(str(p), b"one")
    durable.write_atomic(str(p), b"two")
    assert p.read_bytes() == b"two" and os.listdir(tmp_path) == ["meta.json"]
    assert p.stat().st_mode & 0o777 == 0o600


def test_write_atomic_does_not_follow_a_planted_temp_link(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, tmp_path / "meta.json.tmp")
    durable.write_atomic(str(tmp_path / "meta.json"), b"x")
    assert victim.read_bytes() == b"keep" and (tmp_path / "meta.json").read_bytes() == b"x"


def test_new_file_commits_durably(tmp_path: Path) -> None:
    dest = tmp_path / "restored.img"
    with durable.NewFile(str(dest), 0o644) as f:
        durable.pwrite_all(f.fd, b"data" * 1024, 0)
        f.commit()
    assert dest.read_bytes() == b"data" * 1024 and os.listdir(tmp_path) == ["restored.img"]
    assert dest.stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("plant", ["file", "symlink", "dangling", "dir"])
def test_new_file_never_replaces_or_follows(tmp_path: Path, plant: str) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "vm.img"
    if plant == "file":
        dest.write_bytes(b"old")
    elif plant == "symlink":
        os.symlink(victim, dest)
    elif plant == "dangling":
        os.symlink(tmp_path / "nowhere", dest)
    else:
        dest.mkdir()
    with pytest.raises(FileExistsError):
        durable.NewFile(str(dest))
    assert victim.read_bytes() == b"precious"
    assert not (tmp_path / "nowhere").exists()


def test_new_file_loses_a_race_without_harm(tmp_path: Path) -> None:
    """A link planted after the check but before commit: link() refuses, nothing written
    through it, and the unnamed data vanishes."""
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    dest = tmp_path / "vm.img"
    f = durable.NewFile(str(dest))
    durable.pwrite_all(f.fd, b"x" * 100, 0)
    os.symlink(victim, dest)
    with pytest.raises(FileExistsError):
        f.commit()
    f.discard()
    assert victim.read_bytes() == b"precious"
    assert sorted(os.listdir(tmp_path)) == ["victim", "vm.img"]


def test_new_file_refuses_a_symlinked_directory(tmp_path: Path) -> None:
    real = tmp_path / "real"
    real.mkdir()
    os.symlink(real, tmp_path / "link")
    with pytest.raises(OSError) as e:
        durable.NewFile(str(tmp_path / "link" / "x.img"))
    assert e.value.errno in (errno.ELOOP, errno.ENOTDIR)
    assert os.listdir(real) == []


def test_new_file_without_unnamed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                        ) -> None:
    """Where O_TMPFILE is not supported, a random O_EXCL name is used and cleaned up."""
    real_open = os.open

    def no_tmpfile(path, flags, mode=0o777, *, dir_fd=None):  # type: ignore[no-untyped-def]
        if flags & os.O_TMPFILE == os.O_TMPFILE:
            raise OSError(errno.EOPNOTSUPP, "no O_TMPFILE here")
        return real_open(path, flags, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "open", no_tmpfile)
    dest = tmp_path / "a.img"
    with durable.NewFile(str(dest)) as f:
        durable.pwrite_all(f.fd, b"abc", 0)
        f.commit()
    assert dest.read_bytes() == b"abc" and os.listdir(tmp_path) == ["a.img"]
    with durable.NewFile(str(tmp_path / "b.img")) as f:
        durable.pwrite_all(f.fd, b"abc", 0)
    assert os.listdir(tmp_path) == ["a.img"]  # discarded: its temporary name is gone


def test_new_file_other_errors_pass_through(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        durable.NewFile(str(tmp_path / "no-such-dir" / "x.img"))
    with pytest.raises(IsADirectoryError):
        durable.NewFile(str(tmp_path) + "/")
