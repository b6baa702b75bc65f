"""The agent's configuration state: protected groups and their disks, in SQLite.

Small, rarely written, and always written in one transaction per change, so that a crash
leaves either the old or the new configuration (SQLite's journal does the durable part).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

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


class Store:
    def __init__(self, data_dir: str) -> None:
        os.makedirs(data_dir, exist_ok=True)
        self.path = os.path.join(data_dir, "ferry.db")
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
        with self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute("INSERT INTO groups (name, target, protection, queue_bytes, "
                             "created, settings) VALUES (?, ?, ?, ?, ?, ?)",
                             (name, target, protection, queue_bytes, time.time(),
                              json.dumps(settings or {}, allow_nan=False)))
            for idx, (dname, path, size) in enumerate(disks):
                self._db.execute("INSERT INTO disks VALUES (?, ?, ?, ?, ?, ?)",
                                 (uuid.uuid4().hex[:12], name, idx, dname, path, size))
        group = self.group(name)
        assert group is not None
        return group

    def set_settings(self, name: str, settings: Dict[str, Any]) -> None:
        with self._db:
            self._db.execute("UPDATE groups SET settings = ? WHERE name = ?",
                             (json.dumps(settings, allow_nan=False), name))

    def renew(self, name: str, protection: str, settings: Dict[str, Any]) -> None:
        """A new protection of the group (its stream starts over; failback's return leg)."""
        with self._db:
            self._db.execute("UPDATE groups SET protection = ?, settings = ? WHERE name = ?",
                             (protection, json.dumps(settings, allow_nan=False), name))

    def remove_group(self, name: str) -> None:
        with self._db:
            self._db.execute("DELETE FROM groups WHERE name = ?", (name,))

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
        names = [r[0] for r in self._db.execute("SELECT name FROM groups ORDER BY name")]
        return [g for g in (self.group(n) for n in names) if g is not None]

    def disk_by_path(self, path: str) -> Optional[DiskRow]:
        row = self._db.execute("SELECT id, grp, idx, name, path, size FROM disks "
                               "WHERE path = ?", (path,)).fetchone()
        return DiskRow(*row) if row else None

    # -- pairing -------------------------------------------------------------------------

    def peers(self) -> List[PeerRow]:
        return [PeerRow(*r) for r in self._db.execute(
            "SELECT fingerprint, site, address, cert, paired FROM peers ORDER BY site")]

    def add_peer(self, peer: PeerRow) -> List[PeerRow]:
        """Keep ``peer``; an older certificate of the same site is replaced (returned)."""
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
        return old

    def remove_peer(self, site: str) -> int:
        with self._db:
            return self._db.execute("DELETE FROM peers WHERE site = ? OR fingerprint = ?",
                                    (site, site)).rowcount

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
