"""What a group protected by domain remembers of its domains: ``DATA/domains/GROUP.json``.

For each domain: its name, its definition as it was before Ferry attached it (the XML
travels with the group), and for each protected disk the target dev, the group's disk
name, the image, the splitter's socket and the original ``<disk>`` element, which
``unprotect`` puts back. Written atomically (``formats.durable.write_atomic``: the new
record or the old one survives a crash); a group without a record was protected by disk.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, Optional

from formats.durable import fsync_parent, write_atomic

from ..errors import StorageError


def _path(data_dir: str, group: str) -> str:
    return os.path.join(data_dir, "domains", group + ".json")


def save(data_dir: str, group: str, record: Dict[str, Any]) -> None:
    os.makedirs(os.path.join(data_dir, "domains"), mode=0o700, exist_ok=True)
    write_atomic(_path(data_dir, group), json.dumps(record, indent=1, sort_keys=True).encode())


def load(data_dir: str, group: str) -> Optional[Dict[str, Any]]:
    path = _path(data_dir, group)
    try:
        with open(path, "rb") as f:
            record: Dict[str, Any] = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StorageError("group %s: domain record %s cannot be read: %s"
                           % (group, path, e)) from None
    return record


def remove(data_dir: str, group: str) -> None:
    path = _path(data_dir, group)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    fsync_parent(path)
