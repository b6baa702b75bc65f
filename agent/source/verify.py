"""``ferry verify G [--disk D]`` on the source site: is site B's copy of each disk the same
as the disk here, while replication runs? (DRBD's ``verify``.)

Theory of operation
-------------------
Both sides hash the disk in chunks (xxh3_64, 1 MiB by default): this site reads its disk,
site B hashes each chunk at its newest journaled point (``target/verify.py``), asked in a
probe session (an OPEN with ``verify``: no batch, no change on site B). Neither side stops
for it, so the two sides see different moments; a round therefore hashes this site's chunks
(``a1``), waits ``settle`` seconds for what was written before them to reach site B, asks
site B (``b``), and hashes here again (``a2``). A chunk agrees when ``b`` is ``a1`` or
``a2`` (site B held a state this disk held during the round). The chunks that do not agree
go round again, at most ``rounds`` times. Those left are reported: as *differing* when the
chunk did not change here during the last round (``a1 == a2``: no write in flight to it,
and site B had ``settle`` seconds for everything before), else as *busy* (written in every
round: not compared; verify again when the group is quieter). A false *differing* needs a
write site B has not received within ``settle`` seconds (a link slower than that); its cost
is a resync of one chunk, never data. ``repair`` has the differing ranges read again and
shipped (``resync.py``), which is what ``ferry resync G --disk D --range ...`` does.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import trio
import xxhash

from ..errors import Conflict, Invalid, NotFound, PeerRefused, Unavailable
from ..protocol import frames, messages
from ..store import DiskRow, GroupRow
from .handshake import open_message, session_stream
from .resync import resync
from .settings import parse_target

CHUNK = 1024 * 1024
READ = 64 * 1024 * 1024


def source_digests(path: str, size: int, chunk: int, wanted: Sequence[int]) -> Dict[int, bytes]:
    """xxh3_64 of chunks ``wanted`` of the disk at ``path`` (read here, as it is now)."""
    out: Dict[int, bytes] = {}
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        for c in wanted:
            start = c * chunk
            length = min(chunk, size - start)
            data = os.pread(fd, length, start)
            if len(data) < length:
                data += bytes(length - len(data))
            out[c] = xxhash.xxh3_64_digest(data)
    finally:
        os.close(fd)
    return out


def runs(chunks: Sequence[int], most: int = messages.MAX_VERIFY_CHUNKS
         ) -> List[Tuple[int, int]]:
    """Sorted chunk numbers as (first, count) runs of neighbours, each at most ``most``."""
    out: List[Tuple[int, int]] = []
    for c in sorted(chunks):
        if out and out[-1][0] + out[-1][1] == c and out[-1][1] < most:
            out[-1] = (out[-1][0], out[-1][1] + 1)
        else:
            out.append((c, 1))
    return out


def ranges_of(chunks: Sequence[int], chunk: int, size: int) -> List[Tuple[int, int]]:
    """Chunk numbers as merged byte ranges within the disk."""
    return [(first * chunk, min(size, (first + n) * chunk) - first * chunk)
            for first, n in runs(chunks, 1 << 62)]


async def target_digests(connect: Any, row: GroupRow, site_id: str, index: int, chunk: int,
                         first: int, count: int) -> Tuple[bytes, Tuple[int, int]]:
    """Site B's digests of chunks ``[first, +count)`` of disk ``index``, and its point."""
    host, port = parse_target(row.target)
    what = "verify of group %s on %s" % (row.name, row.target)
    try:
        with trio.fail_after(600):
            stream = await connect(host, port, row.target)
            fs = session_stream(stream, row.target)
            try:
                await fs.send(messages.Hello(site_id))
                await fs.expect(messages.Welcome)
                await fs.send(dataclasses.replace(open_message(row, True),
                                                  verify=(index, chunk, first, count)))
                opened = await fs.expect(messages.Opened)
            finally:
                await fs.aclose()
    except frames.RemoteError as e:
        raise PeerRefused("%s: site B refused: %s" % (what, e)) from None
    except (OSError, EOFError, trio.TooSlowError, frames.ProtocolError,
            trio.BrokenResourceError) as e:
        raise Unavailable("%s: site B cannot be asked: %s" % (
            what, e or type(e).__name__)) from None
    if opened.digests is None or opened.at is None:
        raise Conflict("%s: site B holds no replica of this group to compare (or its agent "
                       "is too old to answer verify)" % what)
    if len(opened.digests) != count * messages.VERIFY_DIGEST:
        raise Unavailable("%s: site B answered %d digests for %d chunks" % (
            what, len(opened.digests) // messages.VERIFY_DIGEST, count))
    return opened.digests, opened.at


async def verify_disk(site: Any, row: GroupRow, d: DiskRow, chunk: int, rounds: int,
                      settle: float) -> Dict[str, Any]:
    total = -(-d.size // chunk)
    index = [x.name for x in row.disks].index(d.name)
    todo = list(range(total))
    at: Optional[Tuple[int, int]] = None
    stable: Dict[int, bool] = {}
    done = 0
    while done < rounds:
        done += 1
        a1 = await trio.to_thread.run_sync(source_digests, d.path, d.size, chunk, todo)
        await trio.sleep(settle)
        b: Dict[int, bytes] = {}
        for first, n in runs(todo):
            digests, point = await target_digests(site.connect, row, site.site_id, index,
                                                  chunk, first, n)
            at = point if at is None else min(at, point)
            step = messages.VERIFY_DIGEST
            for i in range(n):
                b[first + i] = digests[i * step:(i + 1) * step]
        a2 = await trio.to_thread.run_sync(source_digests, d.path, d.size, chunk, todo)
        todo = [c for c in todo if b[c] not in (a1[c], a2[c])]
        stable = {c: a1[c] == a2[c] for c in todo}
        if not todo:
            break
    differing = [c for c in todo if stable[c]]
    busy = [c for c in todo if not stable[c]]
    return {"chunks": total, "same": total - len(todo), "rounds": done,
            "at": list(at) if at else None,
            "differing": [list(r) for r in ranges_of(differing, chunk, d.size)],
            "busy": [list(r) for r in ranges_of(busy, chunk, d.size)]}


async def verify(site: Any, name: str, disk: Optional[str], chunk: int = CHUNK,
                 rounds: int = 4, settle: float = 1.0, repair: bool = False
                 ) -> Dict[str, Any]:
    """Compare each disk of group ``name`` (or only ``disk``) with site B's copy; see the
    module. ``repair``: resync the differing ranges at once. A disk being synced (its
    stream inconsistent) is refused: site B's copy of it is not whole yet."""
    shipper = site.shippers.get(name)
    if shipper is None:
        raise NotFound("no group %s on this site" % name)
    row: GroupRow = shipper.row
    disks = [d for d in row.disks if disk is None or d.name == disk]
    if not disks:
        raise NotFound("group %s has no disk %s" % (name, disk))
    if chunk & (chunk - 1) or not 4096 <= chunk <= messages.MAX_SEED_CHUNK:
        raise Invalid("verify chunk %d is not a power of two from 4 KiB to 64 MiB" % chunk)
    for d in disks:
        link = next((lk for lk in shipper.links if lk.row.name == d.name), None)
        if link is not None and link.inconsistent:
            raise Conflict("group %s: disk %s is being synced (initial sync or resync): site "
                           "B's copy is not whole yet; verify once it replicates"
                           % (name, d.name))
    out: Dict[str, Any] = {"group": name, "chunk": chunk, "disks": {}, "differing_bytes": 0,
                           "repair_asked": False}
    for d in disks:
        result = await verify_disk(site, row, d, chunk, rounds, settle)
        out["disks"][d.name] = result
        ranges = [tuple(r) for r in result["differing"]]
        out["differing_bytes"] += sum(n for _o, n in ranges)
        if repair and ranges:
            await resync(site, name, d.name, ranges)
            out["repair_asked"] = True
    return out
