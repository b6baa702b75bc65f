"""The group's domains as site B keeps them: ``<group directory>/domains.json``.

Site A sends, with every OPEN of a group protected by domain (``protect --domain``), each
domain's definition as it was before Ferry attached it and which of the group's disks each
of its protected target devs is (``payload``); site B writes it here atomically
(``formats.durable.write_atomic``: the new file or the old one survives a crash), replacing
what an earlier session sent, so an updated definition reaches B with the next session.
A group protected by disk has no such file, and its failover starts no VM.
"""

from __future__ import annotations

import json
import os
from typing import Any, Dict, List, Optional, Sequence

from formats.durable import write_atomic

from ..errors import StorageError

NAME = "domains.json"


def payload(rec: Dict[str, Any]) -> List[Dict[str, Any]]:
    """What OPEN carries of a source's domain record (``record.py``)."""
    return [{"name": d["name"], "xml": d["xml"],
             "disks": {x["dev"]: x["disk"] for x in d["disks"]}} for d in rec["domains"]]


def save(directory: str, domains: Sequence[Dict[str, Any]]) -> None:
    data = json.dumps(list(domains), indent=1, sort_keys=True).encode()
    path = os.path.join(directory, NAME)
    try:
        with open(path, "rb") as f:
            if f.read() == data:
                return  # as the last session sent it
    except OSError:
        pass
    write_atomic(path, data)


def load(directory: str) -> Optional[List[Dict[str, Any]]]:
    path = os.path.join(directory, NAME)
    try:
        with open(path, "rb") as f:
            domains: List[Dict[str, Any]] = json.loads(f.read())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise StorageError("the domains of %s cannot be read: %s" % (path, e)) from None
    return domains
