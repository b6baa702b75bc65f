"""The oracle: a writer whose every block says what it is, and a checker of restored points.

Theory of operation
-------------------
The writer (``OracleWriter``) writes whole 4 KiB blocks through NBD exports (the splitters
of one group's disks), one write at a time, each waited for. A block holds a header
(``BLOCK``: magic, disk number, offset, generation of that block, write id), random filler,
and a checksum (blake2b-64 of everything before it) in its last 8 bytes. Write ids grow by
one per write across all disks of the group, so the group's history is one sequence. Every
write is logged when it is sent (``sent``) and when NBD acknowledged it (``acked``); a
flush barrier (a flush of every disk, in turn) is logged once all flushes returned, with
the last write id it covers.

A restored point of the group (``check``) must be a prefix of that sequence: there is one
write id ``W`` such that every block of every disk holds the newest write to it with id at
most ``W`` (zeroes where there is none). ``W`` is the largest write id found anywhere (the
last write of a prefix is never overwritten inside it). The check fails, naming disk and
offset, on a torn block (bad checksum), a block of another place (disk or offset), a write
id the writer never sent, an older or newer block than the prefix says, and a ``W`` before
the barrier the point must reach (acked and flushed writes lost) or past the last write
sent. All disks are checked against the same ``W``: they are at the same barrier.

The log is a list in memory and, optionally, a JSON-lines file (``OracleLog.load``).
"""

from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
import threading
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

BLOCK_SIZE = 4096
MAGIC = b"FYORACLE"
# magic, disk number, offset, generation, write id
HEADER = struct.Struct("<8sHQIQ")
assert HEADER.size == 30
SUM = 8
FILL = BLOCK_SIZE - HEADER.size - SUM
ZERO = bytes(BLOCK_SIZE)


class OracleFailure(AssertionError):
    """A restored point that no prefix of the writer's history explains; one line."""


def checksum(body: bytes) -> bytes:
    return hashlib.blake2b(body, digest_size=SUM).digest()


def make_block(disk: int, offset: int, gen: int, wid: int, fill: Optional[bytes] = None
               ) -> bytes:
    body = HEADER.pack(MAGIC, disk, offset, gen, wid) + (fill if fill is not None
                                                        else os.urandom(FILL))
    return body + checksum(body)


@dataclass(frozen=True)
class Parsed:
    disk: int
    offset: int
    gen: int
    wid: int


def parse_block(block: bytes, where: str) -> Optional[Parsed]:
    """The block's tag; None for a block of zeroes; OracleFailure for a torn or alien one."""
    if block == ZERO:
        return None
    if len(block) != BLOCK_SIZE or block[:len(MAGIC)] != MAGIC:
        raise OracleFailure("%s: not an oracle block (torn or foreign data)" % where)
    if checksum(block[:-SUM]) != block[-SUM:]:
        raise OracleFailure("%s: torn block (checksum does not match)" % where)
    _m, disk, offset, gen, wid = HEADER.unpack_from(block)
    return Parsed(disk, offset, gen, wid)


class OracleLog:
    """The writer's history: each write (id, disk, block, generation) as sent and whether
    acked; the flush barriers (the last write id each covers)."""

    def __init__(self, disks: Sequence[str], path: Optional[str] = None) -> None:
        self.disks = list(disks)
        self.writes: Dict[int, Tuple[int, int, int]] = {}  # wid -> (disk, block, gen)
        self.acked = 0        # the newest acked write id (writes are acked in order)
        self.sent = 0         # the newest write id sent
        self.barriers: List[int] = [0]  # write id covered by each flush barrier
        self.history: Dict[Tuple[int, int], List[int]] = {}  # (disk, block) -> wids
        self.path = path
        self._file = open(path, "a") if path else None

    def _emit(self, entry: dict) -> None:
        if self._file is not None:
            self._file.write(json.dumps(entry) + "\n")
            self._file.flush()

    def sent_write(self, wid: int, disk: int, block: int, gen: int) -> None:
        self.writes[wid] = (disk, block, gen)
        self.history.setdefault((disk, block), []).append(wid)
        self.sent = wid
        self._emit({"w": wid, "d": disk, "b": block, "g": gen})

    def acked_write(self, wid: int) -> None:
        self.acked = wid
        self._emit({"a": wid})

    def barrier(self) -> int:
        """A flush barrier over everything acked; its number."""
        self.barriers.append(self.acked)
        self._emit({"f": len(self.barriers) - 1, "w": self.acked})
        return len(self.barriers) - 1

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @classmethod
    def load(cls, path: str, disks: Sequence[str]) -> OracleLog:
        log = cls(disks)
        with open(path) as f:
            for line in f:
                e = json.loads(line)
                if "w" in e and "d" in e:
                    log.sent_write(e["w"], e["d"], e["b"], e["g"])
                elif "a" in e:
                    log.acked_write(e["a"])
                elif "f" in e:
                    log.barriers.append(e["w"])
        return log

    def expected(self, disk: int, block: int, upto: int) -> int:
        """The write id block ``block`` of ``disk`` holds as of write ``upto`` (0: none)."""
        wids = self.history.get((disk, block), [])
        i = bisect.bisect_right(wids, upto)
        return wids[i - 1] if i else 0

    def barrier_of(self, wid: int) -> int:
        """The newest barrier a prefix up to ``wid`` reaches."""
        return bisect.bisect_right(self.barriers, wid) - 1


@dataclass(frozen=True)
class Verdict:
    prefix: int      # W: the point holds writes 1..W
    barrier: int     # the newest flush barrier that prefix covers
    blocks: int      # blocks checked


def check(images: Dict[str, str], log: OracleLog, barrier: int = 0,
          at_barrier: bool = False) -> Verdict:
    """Check a restored point (``images``: disk name -> image file) against ``log``: see
    the module. ``barrier``: the flush barrier the point must at least reach;
    ``at_barrier``: the point must be exactly at a barrier (a point taken after a flush
    with no write since). OracleFailure names the first thing wrong."""
    if set(images) != set(log.disks):
        raise OracleFailure("the point has disks %s, the group %s"
                            % (sorted(images), sorted(log.disks)))
    found: Dict[Tuple[int, int], int] = {}
    blocks = 0
    for index, name in enumerate(log.disks):
        with open(images[name], "rb") as f:
            block = 0
            while True:
                data = f.read(BLOCK_SIZE)
                if not data:
                    break
                where = "disk %s offset %d" % (name, block * BLOCK_SIZE)
                if len(data) < BLOCK_SIZE:
                    data += bytes(BLOCK_SIZE - len(data))
                tag = parse_block(data, where)
                if tag is not None:
                    if tag.disk != index or tag.offset != block * BLOCK_SIZE:
                        raise OracleFailure("%s: holds the block of disk %s offset %d "
                                            "(a misplaced write)" % (
                                                where, _name(log, tag.disk), tag.offset))
                    if log.writes.get(tag.wid) != (index, block, tag.gen):
                        raise OracleFailure("%s: write %d generation %d was never sent here"
                                            % (where, tag.wid, tag.gen))
                    found[(index, block)] = tag.wid
                blocks += 1
                block += 1
    prefix = max(found.values(), default=0)
    need = log.barriers[barrier]
    if prefix < need:
        raise OracleFailure("the point holds writes up to %d, but barrier %d flushed up to "
                            "%d: acknowledged and flushed writes were lost" % (
                                prefix, barrier, need))
    if prefix > log.sent:
        raise OracleFailure("the point holds write %d, past the last one sent (%d)"
                            % (prefix, log.sent))
    if at_barrier and prefix not in log.barriers:
        raise OracleFailure("the point holds writes up to %d, which is not a flush barrier"
                            % prefix)
    for index, block in log.history:
        want = log.expected(index, block, prefix)
        got = found.get((index, block), 0)
        if got != want:
            raise OracleFailure(
                "disk %s offset %d: holds write %d, but a point holding writes up to %d "
                "must hold %s (not a prefix: %s)" % (
                    log.disks[index], block * BLOCK_SIZE, got, prefix,
                    "write %d" % want if want else "zeroes",
                    "a newer write is missing" if got < want else "a write from its future"))
    for (index, block), wid in found.items():
        if (index, block) not in log.history:
            raise OracleFailure("disk %s offset %d: holds write %d never sent there"
                                % (log.disks[index], block * BLOCK_SIZE, wid))
    return Verdict(prefix, log.barrier_of(prefix), blocks)


def _name(log: OracleLog, index: int) -> str:
    return log.disks[index] if 0 <= index < len(log.disks) else "#%d" % index


class OracleWriter(threading.Thread):
    """Writes oracle blocks through NBD exports (``uris``: disk name -> NBD URI, disks of
    ``size`` bytes; ``blocks`` limits the blocks used, to make overwrites common), one write
    at a time, a flush barrier every ``flush_every`` writes. ``step`` writes synchronously
    (for tests that drive it); ``start``/``finish`` run it in a thread until told. Every
    error is kept in ``errors`` (the writer must see none)."""

    def __init__(self, uris: Dict[str, str], size: int, seed: int = 0,
                 blocks: Optional[int] = None, flush_every: int = 20,
                 log_path: Optional[str] = None, pause: float = 0.001) -> None:
        super().__init__(daemon=True)
        import random

        import nbd

        self.names = list(uris)
        self.log = OracleLog(self.names, log_path)
        self.rng = random.Random(seed)
        self.blocks = min(blocks or size // BLOCK_SIZE, size // BLOCK_SIZE)
        self.flush_every = flush_every
        self.pause = pause
        self.errors: List[BaseException] = []
        self.handles = []
        for name in self.names:
            h = nbd.NBD()
            h.connect_uri(uris[name])
            self.handles.append(h)
        self.gens: Dict[Tuple[int, int], int] = {}
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def step(self) -> int:
        """One write (and a barrier when due); its write id."""
        with self._lock:
            disk = self.rng.randrange(len(self.handles))
            block = self.rng.randrange(self.blocks)
            gen = self.gens.get((disk, block), 0) + 1
            wid = self.log.sent + 1
            self.log.sent_write(wid, disk, block, gen)
            self.handles[disk].pwrite(make_block(disk, block * BLOCK_SIZE, gen, wid),
                                      block * BLOCK_SIZE)
            self.gens[(disk, block)] = gen
            self.log.acked_write(wid)
            if wid % self.flush_every == 0:
                self._barrier()
            return wid

    def barrier(self) -> int:
        """Flush every disk; the barrier's number (a point after it must reach it)."""
        with self._lock:
            return self._barrier()

    def _barrier(self) -> int:
        for h in self.handles:
            h.flush()
        return self.log.barrier()

    def run(self) -> None:
        try:
            while not self._halt.is_set():
                self.step()
                if self.pause:
                    self._halt.wait(self.pause)
        except BaseException as e:  # the test reads it
            self.errors.append(e)

    def finish(self) -> int:
        """Stop, flush, and disconnect; the last barrier. AssertionError if the writer saw
        an error or hung."""
        self._halt.set()
        if self.is_alive():
            self.join(60)
            assert not self.is_alive(), "oracle writer hung"
        assert self.errors == [], self.errors
        last = self.barrier()
        self.close()
        return last

    def close(self) -> None:
        for h in self.handles:
            try:
                h.shutdown()
            except Exception:
                pass
        self.handles = []
        self.log.close()
