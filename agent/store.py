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
class GroupRow:
    name: str
    target: str
    protection: str
    queue_bytes: int
    created: float
    disks: List[DiskRow]
    # history_s, journal_max, checkpoint_interval: see source.DEFAULT_SETTINGS
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
                              json.dumps(settings or {})))
            for idx, (dname, path, size) in enumerate(disks):
                self._db.execute("INSERT INTO disks VALUES (?, ?, ?, ?, ?, ?)",
                                 (uuid.uuid4().hex[:12], name, idx, dname, path, size))
        group = self.group(name)
        assert group is not None
        return group

    def set_settings(self, name: str, settings: Dict[str, Any]) -> None:
        with self._db:
            self._db.execute("UPDATE groups SET settings = ? WHERE name = ?",
                             (json.dumps(settings), name))

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
