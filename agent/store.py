"""The agent's configuration state: protected groups and their disks, in SQLite.

Small, rarely written, and always written in one transaction per change, so that a crash
leaves either the old or the new configuration (SQLite's journal does the durable part).
The database and its ``-wal``/``-shm`` files are never reached through a link: a symlink,
or a file with another hard link, at any of those names is refused with StorageError
before SQLite opens anything (SQLite itself would follow one).

``groups()`` and ``peers()`` are asked on every status call (50 callers at once under load):
they answer from a copy kept since the last change this Store made (``add_group``,
``set_settings``, ``remove_group``; ``add_peer``, ``remove_peer``; the agent is the
database's only writer), not from SQLite each time.
"""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .errors import StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS groups (
    name TEXT PRIMARY KEY,
    target TEXT NOT NULL,
    protection TEXT NOT NULL,
    queue_bytes INTEGER NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS disks (
    id TEXT PRIMARY KEY,
    grp TEXT NOT NULL REFERENCES groups(name) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    name TEXT NOT NULL,
    path TEXT NOT NULL UNIQUE,
    size INTEGER NOT NULL,
    UNIQUE (grp, name)
);
CREATE TABLE IF NOT EXISTS peers (
    fingerprint TEXT PRIMARY KEY,
    site TEXT NOT NULL,
    address TEXT NOT NULL,
    cert TEXT NOT NULL,
    paired REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS pair_tokens (
    id TEXT PRIMARY KEY,
    key BLOB,
    expires REAL NOT NULL,
    used REAL,
    failures INTEGER NOT NULL DEFAULT 0
);
"""


@dataclass(frozen=True)
class DiskRow:
    id: str
    group: str
    index: int
    name: str
    path: str
    size: int


@dataclass(frozen=True)
class PeerRow:
    fingerprint: str
    site: str
    address: str
    cert: str
    paired: float


@dataclass(frozen=True)
class TokenRow:
    id: str
    key: Optional[bytes]  # None once used or burnt
    expires: float
    used: Optional[float]
    failures: int


@dataclass(frozen=True)
class GroupRow:
    name: str
    target: str
    protection: str
    queue_bytes: int
    created: float
    disks: List[DiskRow]
    # history_s, journal_max, checkpoint_interval: see source.settings.DEFAULT_SETTINGS
    settings: Dict[str, Any] = field(default_factory=dict)


def _own_files(path: str) -> None:
    """Make ``path`` if missing, without following a link; refuse it, or its ``-wal`` /
    ``-shm`` companions, when they are not plain files of their own (see the module)."""
    for name, create in ((path, True), (path + "-wal", False), (path + "-shm", False)):
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            fd = os.open(name, flags | (os.O_CREAT if create else 0), 0o600)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise StorageError("the database file %s cannot be opened safely: %s"
                               % (name, e.strerror or e), name, e.errno) from None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise StorageError("the database file %s is not a plain file of its own "
                               "(%d links): refused" % (name, st.st_nlink), name)


class Store:
    def __init__(self, data_dir: str) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "ferry.db")
        _own_files(self.path)
        self._groups: Optional[List[GroupRow]] = None  # groups() until the next change
        self._peers: Optional[List[PeerRow]] = None    # peers(), likewise
        self._db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA foreign_keys = ON")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.executescript(SCHEMA)
        columns = [r[1] for r in self._db.execute("PRAGMA table_info(groups)")]
        if "settings" not in columns:  # a database made before group settings existed
            self._db.execute("ALTER TABLE groups ADD COLUMN settings TEXT NOT NULL DEFAULT '{}'")

    def close(self) -> None:
        self._db.close()

    def site_id(self) -> str:
        row = self._db.execute("SELECT value FROM meta WHERE key = 'site_id'").fetchone()
        if row:
            return str(row[0])
        value = uuid.uuid4().hex
        self._db.execute("INSERT INTO meta VALUES ('site_id', ?)", (value,))
        return value

    def add_group(self, name: str, target: str, queue_bytes: int, disks: List[tuple],
                  protection: str, settings: Optional[Dict[str, Any]] = None) -> GroupRow:
        """``disks`` are (name, path, size); their ids are made here."""
        self._groups = None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO groups (name, target, protection, queue_bytes, "
                             "created, settings) VALUES (?, ?, ?, ?, ?, ?)",
                             (name, target, protection, queue_bytes, time.time(),
                              json.dumps(settings or {}, allow_nan=False)))
            for idx, (dname, path, size) in enumerate(disks):
                self._db.execute("INSERT INTO disks VALUES (?, ?, ?, ?, ?, ?)",
                                 (uuid.uuid4().hex[:12], name, idx, dname, path, size))
        self._groups = None  # again: a reader between the two would have kept the old rows
        group = self.group(name)
        assert group is not None
        return group

    def set_settings(self, name: str, settings: Dict[str, Any]) -> None:
        self._groups = None
        with self._db:
            self._db.execute("UPDATE groups SET settings = ? WHERE name = ?",
                             (json.dumps(settings, allow_nan=False), name))
        self._groups = None

    def renew(self, name: str, protection: str, settings: Dict[str, Any]) -> None:
        """A new protection of the group (its stream starts over; failback's return leg)."""
        with self._db:
            self._db.execute("UPDATE groups SET protection = ?, settings = ? WHERE name = ?",
                             (protection, json.dumps(settings, allow_nan=False), name))

    def set_disk_size(self, disk_id: str, size: int) -> None:
        """A protected disk grew (``source/resize.py``): its new size, from now on."""
        self._groups = None
        with self._db:
            self._db.execute("UPDATE disks SET size = ? WHERE id = ?", (size, disk_id))
        self._groups = None

    def remove_group(self, name: str) -> None:
        self._groups = None
        with self._db:
            self._db.execute("DELETE FROM groups WHERE name = ?", (name,))
        self._groups = None

    def group(self, name: str) -> Optional[GroupRow]:
        row = self._db.execute("SELECT name, target, protection, queue_bytes, created, "
                               "settings FROM groups WHERE name = ?", (name,)).fetchone()
        if row is None:
            return None
        disks = [DiskRow(*r) for r in self._db.execute(
            "SELECT id, grp, idx, name, path, size FROM disks WHERE grp = ? ORDER BY idx",
            (name,))]
        name_, target, protection, queue_bytes, created, settings = row
        return GroupRow(name_, target, protection, queue_bytes, created, disks,
                        json.loads(settings))

    def groups(self) -> List[GroupRow]:
        """Every group, by name (from the copy kept since the last change; see the module).
        The rows are shared between callers: read them, do not change them."""
        if self._groups is None:
            names = [r[0] for r in self._db.execute("SELECT name FROM groups ORDER BY name")]
            self._groups = [g for g in (self.group(n) for n in names) if g is not None]
        return list(self._groups)

    def disk_by_path(self, path: str) -> Optional[DiskRow]:
        row = self._db.execute("SELECT id, grp, idx, name, path, size FROM disks "
                               "WHERE path = ?", (path,)).fetchone()
        return DiskRow(*row) if row else None

    # -- pairing -------------------------------------------------------------------------

    def peers(self) -> List[PeerRow]:
        """The paired sites, by name (from the copy kept since the last change, as
        ``groups``: every status call names them)."""
        if self._peers is None:
            self._peers = [PeerRow(*r) for r in self._db.execute(
                "SELECT fingerprint, site, address, cert, paired FROM peers ORDER BY site")]
        return list(self._peers)

    def add_peer(self, peer: PeerRow) -> List[PeerRow]:
        """Keep ``peer``; an older certificate of the same site is replaced (returned)."""
        self._peers = None
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            old = [PeerRow(*r) for r in self._db.execute(
                "SELECT fingerprint, site, address, cert, paired FROM peers "
                "WHERE site = ? AND fingerprint != ?", (peer.site, peer.fingerprint))]
            self._db.execute("DELETE FROM peers WHERE site = ? AND fingerprint != ?",
                             (peer.site, peer.fingerprint))
            self._db.execute("INSERT OR REPLACE INTO peers VALUES (?, ?, ?, ?, ?)",
                             (peer.fingerprint, peer.site, peer.address, peer.cert,
                              peer.paired))
        self._peers = None
        return old

    def remove_peer(self, site: str) -> int:
        self._peers = None
        try:
            with self._db:
                return self._db.execute("DELETE FROM peers WHERE site = ? OR fingerprint = ?",
                                        (site, site)).rowcount
        finally:
            self._peers = None

    def add_token(self, token_id: str, key: bytes, expires: float) -> None:
        with self._db:
            self._db.execute("DELETE FROM pair_tokens WHERE expires < ?",
                             (time.time() - 86400,))
            self._db.execute("INSERT INTO pair_tokens (id, key, expires) VALUES (?, ?, ?)",
                             (token_id, key, expires))

    def token(self, token_id: str) -> Optional[TokenRow]:
        row = self._db.execute("SELECT id, key, expires, used, failures FROM pair_tokens "
                               "WHERE id = ?", (token_id,)).fetchone()
        return TokenRow(*row) if row else None

    def use_token(self, token_id: str) -> bool:
        """Burn the token; False if it was used already (by a racing pairing)."""
        with self._db:
            cur = self._db.execute("UPDATE pair_tokens SET used = ?, key = NULL "
                                   "WHERE id = ? AND used IS NULL", (time.time(), token_id))
            return cur.rowcount == 1

    def token_failed(self, token_id: str, limit: int) -> bool:
        """Count a wrong MAC; burn the token at ``limit``. True if it is now burnt."""
        with self._db:
            self._db.execute("UPDATE pair_tokens SET failures = failures + 1 WHERE id = ?",
                             (token_id,))
            cur = self._db.execute("UPDATE pair_tokens SET used = ?, key = NULL "
                                   "WHERE id = ? AND used IS NULL AND failures >= ?",
                                   (time.time(), token_id, limit))
            return cur.rowcount == 1
