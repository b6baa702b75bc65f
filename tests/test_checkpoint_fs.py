"""Crash consistency of a real file system and database at every checkpoint: the host
kernel's ext4 mounted on site A's splitter export (nbdfuse -> loop device -> mount), files
written, renamed and deleted and an SQLite database committing transactions, with
checkpoints every 0.5 s. Every checkpoint site B keeps is restored and must be a state the
kernel and SQLite recover from as from a power cut: the file system mounts (its journal
replayed), `PRAGMA integrity_check` says ok, the database holds a prefix of the committed
transactions (never fewer than an older checkpoint), and `e2fsck -fn` then finds nothing."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import threading
import time
from pathlib import Path
from typing import List

import pytest
from conftest import Lab
from test_faults import wait_for

pytestmark = pytest.mark.once  # the first CI pass only (.ci/run)

MiB = 1024 * 1024


def _run(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(list(cmd), check=True, capture_output=True, text=True, timeout=120)


def _losetup(path: Path) -> str:
    return _run("losetup", "--find", "--show", str(path)).stdout.strip()


class Workload:
    """Files created, appended to, renamed and deleted, and SQLite transactions, until
    stopped; ``committed`` is the number of transactions SQLite returned from."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.committed = 0
        self.error: BaseException | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(60)
        if self.error is not None:
            raise self.error

    def _run(self) -> None:
        try:
            db = sqlite3.connect(str(self.root / "ledger.db"), isolation_level=None)
            db.execute("PRAGMA journal_mode=DELETE")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS t (n INTEGER PRIMARY KEY, pad BLOB)")
            n = 0
            while not self._stop.is_set():
                n += 1
                db.execute("BEGIN")
                db.execute("INSERT INTO t VALUES (?, ?)", (n, os.urandom(3000)))
                if n % 7 == 0:
                    db.execute("DELETE FROM t WHERE n = ?", (n - 5,))
                db.execute("COMMIT")
                self.committed = n
                f = self.root / ("f%03d" % (n % 40))
                with open(f, "ab") as out:
                    out.write(os.urandom(8192))
                    if n % 3 == 0:
                        os.fsync(out.fileno())
                if n % 5 == 0:
                    os.replace(f, self.root / ("r%03d" % (n % 11)))
                if n % 13 == 0:
                    victim = self.root / ("r%03d" % (n % 11))
                    if victim.exists():
                        victim.unlink()
            db.close()
        except BaseException as e:  # reported by stop()
            self.error = e


def _check_point(image: Path, mnt: Path) -> int:
    """Mount a restored image (the kernel replays its journal), check the database, unmount,
    fsck: the number of the last transaction the database holds."""
    loop = _losetup(image)
    try:
        _run("mount", "-t", "ext4", loop, str(mnt))
        try:
            last = 0
            if (mnt / "ledger.db").exists():  # not yet created at the first points
                db = sqlite3.connect(str(mnt / "ledger.db"))  # a hot journal rolls back here
                try:
                    assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)], image
                    tables = db.execute("SELECT name FROM sqlite_master").fetchall()
                    if ("t",) in tables:
                        last = db.execute("SELECT coalesce(max(n), 0) FROM t").fetchone()[0]
                finally:
                    db.close()
        finally:
            _run("umount", str(mnt))
        fsck = subprocess.run(["e2fsck", "-fn", loop], capture_output=True, text=True)
        assert fsck.returncode == 0, "%s: e2fsck -fn: %s" % (image, fsck.stdout + fsck.stderr)
        return int(last)
    finally:
        subprocess.run(["losetup", "-d", loop], check=False)


def test_ext4_and_sqlite_recover_at_every_checkpoint(sites: Lab, tmp_path: Path) -> None:
    img = sites.image("vda.img", 48 * MiB)
    _run("mkfs.ext4", "-q", "-F", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(img))
    uri = sites.protect("g1", img, extra=("--checkpoint-interval", "0.5s"))["vda"]
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")

    fuse, mnt = tmp_path / "fuse", tmp_path / "mnt"
    fuse.mkdir()
    mnt.mkdir()
    proc = subprocess.Popen(["nbdfuse", str(fuse), uri])
    loop = ""
    try:
        wait_for(lambda: (fuse / "nbd").exists(), what="nbdfuse on site A")
        loop = _losetup(fuse / "nbd")
        _run("mount", "-t", "ext4", loop, str(mnt))
        work = Workload(mnt)
        work.start()
        time.sleep(5)
        work.stop()
        _run("umount", str(mnt))
    finally:
        subprocess.run(["umount", str(mnt)], check=False, capture_output=True)
        if loop:
            subprocess.run(["losetup", "-d", loop], check=False)
        subprocess.run(["umount", str(fuse)], check=False)
        proc.wait(30)
    assert work.committed > 20, work.committed
    sites.a.ferry("wait", "g1", "--synced", "--timeout", "60")
    sites.a.ferry("checkpoint", "g1", "--tag", "after")

    cps = json.loads(sites.b.ferry("checkpoints", "g1", "--json").stdout)["target"]
    assert len(cps) >= 6, cps
    held: List[int] = []
    for c in cps:
        dest = tmp_path / ("cp-%s.img" % c["id"])
        sites.b.ferry("restore", "g1", "--disk", "vda", "--checkpoint", c["id"],
                      "--to", str(dest))
        held.append(_check_point(dest, mnt))
        dest.unlink()
    assert held == sorted(held), held
    # The last checkpoint follows a clean unmount: every committed transaction is in it.
    assert held[-1] == work.committed, (held, work.committed)
    print("\n%d checkpoints restored: each mounts, integrity_check ok, e2fsck -fn clean; "
          "transactions held: %s of %d committed" % (len(cps), held, work.committed))
