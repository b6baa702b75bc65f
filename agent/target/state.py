"""What a target group holds, as the rooms that work on it see it.

``TargetGroup`` (``group.py``) owns this state and the lock; the applier, restore, failover
and status modules are handed the group and read or change it with the lock held. They know
it through ``GroupData``, the part of the group they may use, so none of them imports
``group.py`` and the group stays the one room above them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Protocol, Tuple

from formats.records import Point

from ..checkpoints import Checkpoint
from .holdback import HoldBack
from .journal import Journal, Position
from .seeds import GroupSeeds


@dataclass
class DiskState:
    name: str
    size: int
    gen: int = 0            # newest journaled record
    seq: int = 0
    applied_gen: int = 0    # newest record applied to the replica
    applied_seq: int = 0
    # Growths (ferry resize): (gen, seq, size) each, oldest first: a point at or before
    # (gen, seq) sees the disk at that size.
    grown: List[Tuple[int, int, int]] = field(default_factory=list)

    def size_at(self, point: Tuple[int, int]) -> int:
        """The disk's size as of ``point`` (gen, seq): smaller before a growth."""
        for gen, seq, size in self.grown:
            if tuple(point) <= (gen, seq):
                return size
        return self.size


class GroupData(Protocol):
    name: str
    directory: str
    disks: List[DiskState]
    fds: List[int]                   # the replicas, open, in disk order
    writers: List[Any]               # their writers (aio.py), in disk order
    digests: List[Any]               # their chunk digests (digests.ReplicaDigests)
    journal: Journal
    applied: Position                # the journal position the replicas hold
    since_checkpoint: int            # bytes applied since the last replica checkpoint
    whole_after_meta: bool           # records a restart would apply again
    gate: HoldBack                   # the applier's hold-back state
    seeds: GroupSeeds
    checkpoints: List[Checkpoint]
    history_s: float
    journal_max: int
    short_history: bool
    pins: int
    failover: Optional[Dict[str, Any]]
    state: Any                       # GroupState (group.py): its value is the status' state

    replica_format: str              # raw, qcow2 or vmdk (wrappers.py)
    image_errors: Dict[str, str]     # disk -> why its image of that format is not made

    def replica_path(self, disk: str) -> str: ...

    def image_path(self, disk: str) -> str: ...

    def index_of(self, disk: str) -> int: ...

    def point(self, ref: Optional[str] = None, at_wall_ns: Optional[int] = None
              ) -> Tuple[Optional[Checkpoint], List[Point], bool]: ...

    def newest(self) -> Tuple[List[Point], bool]: ...

    def save_meta(self, synced: bool = False) -> None: ...

    def failed_over(self, record: Dict[str, Any]) -> None: ...
