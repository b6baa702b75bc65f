"""Group checkpoints: where the source cuts a group's timeline, and how a point is chosen.

Theory of operation (source)
----------------------------
A checkpoint asks for the group's state at one instant T of the source host's
CLOCK_MONOTONIC (the clock of every record's ``time_ns``). For each disk, the changes
completed by T are its records with ``time_ns <= T``: records carry sequence numbers in time
order, so the disk's *cut* is the highest ``(gen, seq)`` with ``time_ns <= T``. The cut is
known once every disk's watermark has reached T (the splitter promises that every change
completed before a batch's watermark is in that batch or an earlier one). No write after T
is in any cut and none before T is missing: the checkpoint is crash-consistent for all the
group's disks at once.

A disk that was inconsistent at T (changes went to its dirty map: they are in no record)
makes the checkpoint impossible. The splitter holds its watermark at the moment the disk
became inconsistent until the ``KIND_CONSISTENT`` marker, so when the watermark passes T the
record after the cut exists: if it carries ``FLAG_INCONSISTENT`` or is the marker, the disk
was inconsistent at T.

``Cutter`` is fed the records the shipper forwards and the batches' watermarks, in order,
per disk; it does no I/O and reads no clock.

Choosing a point (target)
-------------------------
``choose`` picks a checkpoint from a list by id, by tag (the newest with it), or by time
(the newest at or before it).
"""

from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Dict, List, Optional, Sequence, Tuple

from formats.localwire import FLAG_INCONSISTENT, KIND_CONSISTENT

from .errors import NotFound
from .protocol import frames

Point = Tuple[int, int]  # (gen, seq)

KINDS = ("auto", "user", "move", "app")  # move: site B fails over live at it
# (agent/source/move.py); app: the guests were frozen around it (agent/domains/quiesce.py)
MAX_TAG = 256


class CheckpointError(NotFound):
    """A checkpoint cannot be made or found; the message says why, for the user."""


@dataclass
class Checkpoint:
    id: str
    time_ns: int                       # source CLOCK_MONOTONIC of the cut
    kind: str                          # "auto", "user", "move" or "app"
    tag: Optional[str] = None
    cut: List[Point] = field(default_factory=list)
    wall_ns: int = 0                   # source wall clock of the cut
    tags: List[str] = field(default_factory=list)  # added later ("tested")

    def to_wire(self) -> Dict[str, Any]:
        return {"id": self.id, "time_ns": self.time_ns, "kind": self.kind, "tag": self.tag,
                "cut": [list(c) for c in self.cut]}

    def to_json(self) -> Dict[str, Any]:
        return {"id": self.id, "time_ns": self.time_ns, "wall_ns": self.wall_ns,
                "kind": self.kind, "tag": self.tag, "cut": [list(c) for c in self.cut],
                "tags": list(self.tags)}

    def encode(self) -> bytes:
        """The data of the checkpoint's journal marker."""
        return json.dumps(self.to_json(), sort_keys=True).encode()

    @classmethod
    def decode(cls, data: bytes) -> Checkpoint:
        obj = json.loads(data)
        return cls(obj["id"], obj["time_ns"], obj["kind"], obj.get("tag"),
                   [(c[0], c[1]) for c in obj["cut"]], obj.get("wall_ns", 0),
                   list(obj.get("tags", [])))


def parse_wire(obj: Any, ndisks: int) -> Checkpoint:
    """A checkpoint from a BATCH body, every field checked."""
    if not isinstance(obj, dict):
        raise frames.ProtocolError("checkpoint entry is not a map")
    cid = frames.field(obj, "id", str)
    if not cid or len(cid) > 64 or not cid.isalnum():
        raise frames.ProtocolError("bad checkpoint id %r" % cid[:64])
    time_ns = frames.field(obj, "time_ns", int)
    kind = frames.field(obj, "kind", str)
    if kind not in KINDS:
        raise frames.ProtocolError("unknown checkpoint kind %r" % kind[:32])
    tag = obj.get("tag")
    if tag is not None and (not isinstance(tag, str) or len(tag) > MAX_TAG):
        raise frames.ProtocolError("bad checkpoint tag")
    raw = frames.field(obj, "cut", list)
    if len(raw) != ndisks:
        raise frames.ProtocolError("checkpoint cut of %d disks for a group of %d"
                                 % (len(raw), ndisks))
    cut = []
    for c in raw:
        if not (isinstance(c, list) and len(c) == 2 and all(
                isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in c)):
            raise frames.ProtocolError("bad checkpoint cut entry %r" % (c,))
        cut.append((c[0], c[1]))
    return Checkpoint(cid, time_ns, kind, tag, cut)


@dataclass
class _Entry:
    time_ns: int
    point: Point
    inconsistent: bool  # this record says its disk was inconsistent when it was recorded


@dataclass
class Request:
    checkpoint: Checkpoint
    result: Optional[str] = None  # None while pending; "ok" or why it is impossible


class Cutter:
    """Cuts a group's timeline at requested instants (see the module's theory)."""

    def __init__(self, ndisks: int) -> None:
        self.ndisks = ndisks
        self._base: List[Point] = [(0, 0)] * ndisks
        self._entries: List[Deque[_Entry]] = [deque() for _ in range(ndisks)]
        self._watermark = [0] * ndisks
        self._pending: List[Request] = []

    def reset(self, durable: Sequence[Point]) -> List[Request]:
        """A session starts from what the target holds: forget the timeline, fail what is
        pending (returned, each with its result set)."""
        self._base = list(durable)
        self._entries = [deque() for _ in range(self.ndisks)]
        self._watermark = [0] * self.ndisks
        failed = self._pending
        for req in failed:
            req.result = "the link to the target was lost before the cut was known"
        self._pending = []
        return failed

    def restarted(self, disk: int) -> List[Request]:
        """A disk's splitter came back with a new generation: what the old one had not
        forwarded is lost to the stream (the new one resyncs it), so no pending instant
        can be cut; they fail (returned, each with its result set)."""
        failed = self._pending
        for req in failed:
            req.result = "disk %d's splitter restarted before the cut was known" % disk
        self._pending = []
        self._watermark[disk] = 0
        return failed

    def forwarded(self, disk: int, records: Sequence[Any]) -> None:
        """Records of ``disk`` the shipper forwarded, in sequence (localwire.Record)."""
        q = self._entries[disk]
        for r in records:
            bad = bool(r.flags & FLAG_INCONSISTENT) or r.kind == KIND_CONSISTENT
            q.append(_Entry(r.time_ns, (r.gen, r.seq), bad))
        if not self._pending:
            self._collapse(disk, None)

    def watermark(self, disk: int, watermark_ns: int) -> None:
        if watermark_ns > self._watermark[disk]:
            self._watermark[disk] = watermark_ns

    def request(self, checkpoint: Checkpoint) -> Request:
        req = Request(checkpoint)
        self._pending.append(req)
        self._pending.sort(key=lambda r: r.checkpoint.time_ns)
        return req

    def pending(self) -> int:
        return len(self._pending)

    def resolve(self) -> List[Request]:
        """Requests whose cut is now known, each with its result (and its cut if "ok")."""
        done = []
        while self._pending and all(w >= self._pending[0].checkpoint.time_ns
                                    for w in self._watermark):
            req = self._pending.pop(0)
            t = req.checkpoint.time_ns
            cut = []
            reason = None
            for d in range(self.ndisks):
                point, after = self._cut(d, t)
                cut.append(point)
                if after is not None and after.inconsistent and reason is None:
                    reason = "disk %d was being resynced at that instant" % d
            req.checkpoint.cut = cut
            req.result = reason or "ok"
            done.append(req)
        nxt = self._pending[0].checkpoint.time_ns if self._pending else None
        for d in range(self.ndisks):
            self._collapse(d, nxt)
        return done

    def _cut(self, disk: int, t: int) -> Tuple[Point, Optional[_Entry]]:
        """The disk's newest point at or before ``t`` and the record after it (if any)."""
        point = self._base[disk]
        for e in self._entries[disk]:
            if e.time_ns > t:
                return point, e
            point = e.point
        return point, None

    def _collapse(self, disk: int, keep_after: Optional[int]) -> None:
        """Fold into the base the entries no pending request can need: a cut at or after
        their time is the same with them folded (new requests are never older than a
        forwarded record: a record is forwarded after its change completed)."""
        q = self._entries[disk]
        while q and (keep_after is None or q[0].time_ns <= keep_after):
            self._base[disk] = q.popleft().point


def choose(checkpoints: Sequence[Checkpoint], ref: Optional[str] = None,
           at_wall_ns: Optional[int] = None) -> Checkpoint:
    """The checkpoint named by id or tag, or the newest at or before a wall time."""
    if ref is not None:
        for c in checkpoints:
            if c.id == ref:
                return c
        tagged = [c for c in checkpoints if c.tag == ref or ref in c.tags]
        if tagged:
            return tagged[-1]
        raise CheckpointError("no checkpoint with id or tag %r in the journal" % ref)
    if at_wall_ns is not None:
        before = [c for c in checkpoints if c.wall_ns <= at_wall_ns]
        if not before:
            raise CheckpointError("no checkpoint at or before that time in the journal (the "
                                  "oldest is %s)" % (_iso(checkpoints[0].wall_ns)
                                                     if checkpoints else "none: it is empty"))
        return before[-1]
    if not checkpoints:
        raise CheckpointError("the journal holds no checkpoint")
    return checkpoints[-1]


def _iso(wall_ns: int) -> str:
    import datetime
    return datetime.datetime.fromtimestamp(wall_ns / 1e9, datetime.timezone.utc).isoformat(
        timespec="milliseconds")


iso = _iso
