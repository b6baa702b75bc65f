"""Files Ferry creates by name are never written through a planted link (issue 18).

For each kind of file the agent, the splitter and the view plugin write by name (state and
metadata, certificates, pid files, seeds, the activity log, rotated logs, logs, view specs,
the database), links are planted where an older Ferry would have written (its fixed temporary
names) and at the destination itself, each pointing at a victim file: the victim must keep
its content. Real files in a temporary directory; nothing is mocked but the random temporary
name in the one test that exhausts them.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import Callable, List, Tuple

import pytest

from agent import logs, tls
from agent.domains import record
from agent.errors import StorageError
from agent.store import Store
from agent.target import meta, seeds
from formats import durable
from nbd_plugin.activity import ActivityLog

KEEP = b"victim: keep me\n"


def _victim(tmp_path: Path) -> Path:
    v = tmp_path / "victim"
    v.write_bytes(KEEP)
    return v


def _write_meta(d: Path) -> Path:
    meta.save(str(d), {"group": "g"})
    return d / "meta.json"


def _write_record(d: Path) -> Path:
    os.makedirs(d / "domains", exist_ok=True)
    record.save(str(d), "g", {"domains": []})
    return d / "domains" / "g.json"


def _write_key(d: Path) -> Path:
    os.makedirs(d / "tls", mode=0o700, exist_ok=True)
    tls.load_identity(str(d), "a")
    return d / "tls" / "site.key"


def _write_pid(d: Path) -> Path:
    durable.write_atomic(str(d / "vda.pid"), b"123\n", 0o644)
    return d / "vda.pid"


def _write_seed(d: Path) -> Path:
    src = d.parent / "seed.img"
    src.write_bytes(b"s" * 65536)
    seeds.adopt(str(src), str(d / "vda.img"), 65536)
    return d / "vda.img"


def _write_activity(d: Path) -> Path:
    ActivityLog(str(d / "vda.al"), slots=16).close()
    return d / "vda.al"


def _write_rotated(d: Path) -> Path:
    (d / "vda.log").write_bytes(b"line\n" * 100)
    assert logs.rotate(str(d), limit=10) == [str(d / "vda.log")]
    return d / "vda.log.1"


# (kind, writer, the fixed temporary names older Ferrys used)
REPLACED: List[Tuple[str, Callable[[Path], Path], List[str]]] = [
    ("meta", _write_meta, ["meta.json.tmp"]),
    ("domain-record", _write_record, ["domains/g.json.tmp"]),
    ("certificate-key", _write_key, ["tls/site.key.tmp", "tls/site.crt.tmp"]),
    ("pid", _write_pid, ["vda.pid.tmp"]),
    ("seeded-replica", _write_seed, ["vda.img.seeding"]),
    ("activity-log", _write_activity, ["vda.al.tmp"]),
    ("rotated-log", _write_rotated, ["vda.log.1.tmp"]),
]


def _dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    for sub in ("", "domains", "tls"):
        os.makedirs(d / sub, exist_ok=True)
    return d


@pytest.mark.parametrize("kind,write,temps", REPLACED, ids=[k for k, _, _ in REPLACED])
def test_a_link_at_an_old_temporary_name_is_not_followed(tmp_path: Path, kind, write,
                                                         temps) -> None:
    victim, d = _victim(tmp_path), _dir(tmp_path)
    for t in temps:
        os.symlink(victim, d / t)
    dest = write(d)
    assert victim.read_bytes() == KEEP
    assert stat.S_ISREG(os.lstat(dest).st_mode)
    for t in temps:  # left as planted: nothing was written through it
        assert os.readlink(d / t) == str(victim)


AT_DEST = [r for r in REPLACED if r[0] != "certificate-key"]  # refused: see below


@pytest.mark.parametrize("kind,write,temps", AT_DEST, ids=[k for k, _, _ in AT_DEST])
def test_a_link_at_the_destination_is_replaced_not_followed(tmp_path: Path, kind, write,
                                                            temps) -> None:
    victim, d = _victim(tmp_path), _dir(tmp_path)
    dest = write(d)  # learn the name, then plant a symlink there
    os.unlink(dest)
    os.symlink(victim, dest)
    write(d)
    assert victim.read_bytes() == KEEP
    assert stat.S_ISREG(os.lstat(dest).st_mode)


@pytest.mark.parametrize("kind,write,temps", AT_DEST, ids=[k for k, _, _ in AT_DEST])
def test_a_hard_link_at_the_destination_keeps_its_content(tmp_path: Path, kind, write,
                                                          temps) -> None:
    victim, d = _victim(tmp_path), _dir(tmp_path)
    dest = write(d)
    os.unlink(dest)
    os.link(victim, dest)
    write(d)
    assert victim.read_bytes() == KEEP and os.stat(victim).st_nlink == 1


def test_no_temporary_name_is_left_behind(tmp_path: Path) -> None:
    d = _dir(tmp_path)
    for _, write, _ in REPLACED:
        write(d)
        write(d)
    left = [str(p) for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]
    assert left == []


def test_a_failed_write_leaves_the_old_content_and_no_temporary(tmp_path: Path) -> None:
    p = tmp_path / "meta.json"
    durable.write_atomic(str(p), b"old")
    with pytest.raises(RuntimeError):
        with durable.ReplaceFile(str(p)) as f:
            os.write(f.fd, b"half")
            raise RuntimeError("crash before commit")
    assert p.read_bytes() == b"old" and os.listdir(tmp_path) == ["meta.json"]


def test_temporary_names_all_taken_is_refused(tmp_path: Path, monkeypatch) -> None:
    victim = _victim(tmp_path)
    monkeypatch.setattr(durable.secrets, "token_hex", lambda n: "0" * (2 * n))
    os.symlink(victim, tmp_path / (".meta.json.%s.tmp" % ("0" * 16)))
    with pytest.raises(FileExistsError):
        durable.write_atomic(str(tmp_path / "meta.json"), b"x")
    assert victim.read_bytes() == KEEP and not (tmp_path / "meta.json").exists()


def test_a_directory_at_the_destination_is_refused(tmp_path: Path) -> None:
    (tmp_path / "meta.json").mkdir()
    with pytest.raises(IsADirectoryError):
        durable.write_atomic(str(tmp_path / "meta.json"), b"x")
    assert os.listdir(tmp_path) == ["meta.json"]  # the temporary went with the failure
    with pytest.raises(IsADirectoryError):
        durable.ReplaceFile(str(tmp_path) + "/")


def test_scratch_files_refuse_any_name_that_exists(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    os.symlink(victim, tmp_path / "vda.json")
    with pytest.raises(FileExistsError):
        durable.write_new(str(tmp_path / "vda.json"), b"{}")
    durable.write_new(str(tmp_path / "vdb.json"), b"{}")
    assert victim.read_bytes() == KEEP and (tmp_path / "vdb.json").read_bytes() == b"{}"


def test_logs_refuse_a_symlink(tmp_path: Path) -> None:
    victim = _victim(tmp_path)
    os.symlink(victim, tmp_path / "vda.log")
    with pytest.raises(OSError) as e:
        durable.open_append(str(tmp_path / "vda.log"))
    assert e.value.errno == errno.ELOOP and victim.read_bytes() == KEEP
    fd = durable.open_append(str(tmp_path / "vdb.log"))
    os.write(fd, b"a")
    os.close(fd)
    fd = durable.open_append(str(tmp_path / "vdb.log"))
    os.write(fd, b"b")
    os.close(fd)
    assert (tmp_path / "vdb.log").read_bytes() == b"ab"


@pytest.mark.parametrize("name", ["site.key", "site.crt"])
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_the_tls_identity_is_never_reached_through_a_link(tmp_path: Path, name, link) -> None:
    victim, d = _victim(tmp_path), _dir(tmp_path)
    _write_key(d)
    os.unlink(d / "tls" / name)
    (os.symlink if link == "symlink" else os.link)(victim, d / "tls" / name)
    with pytest.raises(StorageError, match=name):
        tls.load_identity(str(d), "a")
    assert victim.read_bytes() == KEEP


@pytest.mark.parametrize("suffix", ["", "-wal", "-shm"])
@pytest.mark.parametrize("link", ["symlink", "hardlink"])
def test_the_database_is_never_reached_through_a_link(tmp_path: Path, suffix, link) -> None:
    victim = _victim(tmp_path)
    d = tmp_path / "data"
    d.mkdir()
    (os.symlink if link == "symlink" else os.link)(victim, d / ("ferry.db" + suffix))
    with pytest.raises(StorageError, match="ferry.db" + suffix):
        Store(str(d))
    assert victim.read_bytes() == KEEP


def test_the_database_opens_again_as_its_own_file(tmp_path: Path) -> None:
    s = Store(str(tmp_path))
    sid = s.site_id()
    s.close()
    s = Store(str(tmp_path))
    assert s.site_id() == sid
    s.close()
